"""
The public face of pipecomet's backend client (see ``docs/backends.md``).
"""

from ._backend import *  # noqa: F401,F403
from ._backend import __all__  # noqa: F401
