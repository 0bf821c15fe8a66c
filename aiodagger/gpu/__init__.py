"""GPU support through cupy (internal package; the public names are re-exported by
:mod:`aiodagger`'s ``gpu`` attribute).

* :mod:`.arrays` - which values are device arrays, their size, host <-> device moves.
"""
