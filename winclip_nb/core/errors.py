"""Exception types. Every message names the offending path or value.

The CLI turns any :class:`WinCLIPError` into one line on stderr and a non-zero
exit code (a traceback only with ``--debug``). All of them are importable from the
package itself: ``from winclip_nb import ConfigError``.
"""


class WinCLIPError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(WinCLIPError, ValueError):
    """A setting is out of range or inconsistent (names the setting and value)."""


class DataError(WinCLIPError):
    """A data folder or file is missing or has the wrong layout (names the path)."""


class ImageReadError(DataError):
    """An image file cannot be decoded: corrupt, truncated or not an image."""


class WeightsError(WinCLIPError):
    """Model weights cannot be resolved: unknown tag, missing file, offline hub."""


class DeviceError(WinCLIPError):
    """The requested device is not available (e.g. ``cuda`` without CUDA)."""


class MemoryBankError(WinCLIPError):
    """A saved memory bank is unreadable or was built with other settings."""


class ExplainerError(WinCLIPError):
    """The language-model explainer failed to load or to run."""


class StorageError(WinCLIPError, OSError):
    """A file cannot be written: no space left, no permission, a read-only disk
    (names the path; nothing half-written is left behind)."""
