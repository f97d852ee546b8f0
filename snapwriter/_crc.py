"""The CRC-32 of archive records: the same value as zlib's and torch's, as fast as we can.

torch.save checksums every record with the zip CRC-32 (torch's miniz, about 2 GB/s
here); CPython's :func:`zlib.crc32` computes the same value at the same speed. With the
optional extra ``snapwriter[fast]`` installed, `python-isal
<https://pypi.org/project/isal/>`_'s ``crc32`` (Intel ISA-L, carry-less multiplication
instructions: about 9 GB/s on the same machine) computes it instead: a 0.5 GiB snapshot
is checksummed in ~0.06 s instead of ~0.27 s. Both release the GIL on large buffers.

Where this is used, the bytes written are torch.save's whatever the implementation
(the differential tests compare both with zlib on the same buffers).

Torch-free: the saving process imports this.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

__all__ = ("IMPLEMENTATION", "crc32")

crc32: Callable[..., int]
#: Which implementation :func:`crc32` is: ``"isal"`` or ``"zlib"``.
IMPLEMENTATION: str

try:
    from isal import isal_zlib as _isal
except ImportError:  # the optional extra is not installed
    crc32, IMPLEMENTATION = zlib.crc32, "zlib"
else:
    crc32, IMPLEMENTATION = _isal.crc32, "isal"
