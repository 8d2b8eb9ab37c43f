"""The LMDB engine: the embedded default, durable and close to the disk's limit.

One LMDB environment per journal directory, shared by every client of it in
a process; several processes may share the directory. Writes from all
threads of a process go through one group committer, so many appends share
one sync while each caller returns only after its own write is committed.

Modules: ``_keys`` (the key layout), ``_errors`` (lmdb's errors as the
journal's), ``_gate`` (map resizes run alone), ``_committer`` (group
commit), ``_pages`` (LMDB's file format, read without LMDB), ``_check``
(the check before opening, and :func:`verify`), ``_environment`` (one
environment per path per process) and ``_backend`` (:class:`LMDBBackend`).
"""

from runjournal.backends.lmdb._backend import LMDBBackend, LMDBInfo
from runjournal.backends.lmdb._check import Problem, VerifyReport, verify
from runjournal.backends.lmdb._environment import DEFAULT_MAP_SIZE

__all__ = ["DEFAULT_MAP_SIZE", "LMDBBackend", "LMDBInfo", "Problem", "VerifyReport", "verify"]
