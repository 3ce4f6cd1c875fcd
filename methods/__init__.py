"""The registry: one entry per paper. A new method is tested by being registered here."""

from .lcm import LCM

METHODS = {
    "lcm": LCM,
}
