"""The registry: one entry per paper. A new method is tested by being registered here."""

from .dmd2 import DMD2
from .lcm import LCM
from .scm import SCM
from .sid import SiD
from .tscd import TSCD

METHODS = {
    "lcm": LCM,
    "tscd": TSCD,
    "sid": SiD,
    "dmd2": DMD2,
    "scm": SCM,
}
