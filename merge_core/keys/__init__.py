"""Module naming: suffix styles, the SDXL table and its aliases, and the key profiles."""
from .profiles import PROFILES, Naming, resolve
from .suffixes import KOHYA, PEFT, Suffixes, group_keys, style_of

__all__ = ["PROFILES", "Naming", "resolve", "KOHYA", "PEFT", "Suffixes", "group_keys", "style_of"]
