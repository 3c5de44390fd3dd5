"""kvd's build: the pure modules every request passes through are compiled with mypyc.

They stay plain, typed Python; mypyc turns them into C extensions that run the same code
about twice as fast (docs/DECISIONS.md, "A compiled hot path"). Everything else in
pyproject.toml. ``KVD_PURE=1`` builds plain Python only (no C compiler needed); so does
`make venv`'s editable install, after which `make compiled` builds the extensions in place.
"""

import os

from setuptools import setup

# The modules compiled: pure code (no I/O, no trio), where a request spends its Python
# calls on decoding, versions and keys. A module listed here must type-check as mypyc
# reads it: it enforces each annotation (and each local's inferred type) at run time.
COMPILED = [
    "kvd/versions/causality.py",
    "kvd/versions/encoding.py",
    "kvd/proto/codec.py",
    "kvd/proto/schema.py",
    "kvd/ring/ring.py",
    "kvd/storage/keys.py",
]

ext_modules = []
if os.environ.get("KVD_PURE") != "1":
    from mypyc.build import mypycify

    ext_modules = mypycify(COMPILED, group_name="kvd.native")

setup(ext_modules=ext_modules)
