"""Content digests and manifests: every finished file is recorded, and checked before it is used.

A manifest vouches for files as records ``{"path", "size", "sha256"}``: a shard's
``_manifest/shard-NNNNN.json`` (its shard as ``output``, files it writes beside it as ``outputs``),
train-step's (metrics, optimizer state, the policy folder's files), eval's ``_manifest/summary.json``,
a policy's ``scope-policy.json`` (``files``) and ``eval-sets/_manifest.json`` (``files``).

``sha256`` is the SHA-256 of the file; for files over 1 GiB (a 7B policy's weight files, its optimizer
state) the record also holds ``"block": 268435456`` and ``sha256`` is the SHA-256 of the concatenated
SHA-256 digests of the file's consecutive 256 MiB blocks, which threads hash in parallel: one core
hashes ~1 GB/s, and a 61 GB optimizer file must not take a minute (docs/RELIABILITY.md, "cost").

Who hashes what, how often:
- the writer hashes each file once, right after writing it (still in the page cache);
- a stage checks every file it reads against its manifest before using it (`shards.complete_shards`,
  the input policy, the previous round's train state, the eval sets), and a writer checks its own
  outputs before skipping them as done (`shards.is_done`), so rerunning the writer recomputes a
  damaged output, to the same bytes;
- within one process a file is hashed at most once: digests are cached by (device, inode, size,
  mtime_ns). A file changed in place gets a new mtime and is hashed again. A file hashed within
  RACY_NS of its last change is not cached (a change in the same clock tick would keep its mtime),
  except a file this process wrote itself (`remember`): nobody else writes into a new inode;
- `scope status` hashes only files changed after their manifest (`--verify`: every file).

Nothing heavy is imported here: `scope status` uses it.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any

from scope_cli.errors import json_object

RACY_NS = 50_000_000
BIG, BLOCK = 1 << 30, 256 << 20  # files over BIG are hashed as BLOCK-sized blocks, in threads
_READ = 1 << 22
_CACHE: dict[tuple, str] = {}
PARALLEL_BYTES = 64 << 20  # hash small files in threads once they add up to this much
STAGE_WRITERS = {"rollouts": "generate", "verified": "verify", "scored": "prm-score",
                 "located": "locate-error", "rectified": "rectify", "train": "train-step", "eval": "eval"}


# ---- digests -------------------------------------------------------------------------------------
def _key(st: os.stat_result, block: int | None) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, block)


def block_for(size: int) -> int | None:
    """The block size a file of `size` bytes is hashed in (None: one plain sha256)."""
    return BLOCK if size > BIG else None


def _hash_range(fd: int, start: int, length: int) -> bytes:
    h = hashlib.sha256()
    while length > 0:
        data = os.pread(fd, min(_READ, length), start)
        if not data:
            break
        h.update(data)  # hashlib and pread release the GIL: threads hash in parallel
        start, length = start + len(data), length - len(data)
    return h.digest()


def _hash_file(path: Path, block: int | None = None) -> str:
    """The file's sha256 or, with `block`, the sha256 of the concatenated sha256 digests of its
    consecutive `block`-byte blocks, hashed by up to 32 threads (one large file in seconds, where
    a single sha256 runs at one core's ~1 GB/s)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if block is None:
            return _hash_range(fd, 0, size).hex()
        from concurrent.futures import ThreadPoolExecutor

        n = max(1, -(-size // block))
        with ThreadPoolExecutor(min(n, os.cpu_count() or 1, 32)) as pool:
            parts = pool.map(lambda i: _hash_range(fd, i * block, block), range(n))
            return hashlib.sha256(b"".join(parts)).hexdigest()
    finally:
        os.close(fd)


def sha256_of(path: Path, block: int | None = None) -> str:
    """The file's digest (see `_hash_file`), from the cache when this process already hashed it."""
    st = os.stat(path)
    key = _key(st, block)
    if key in _CACHE:
        return _CACHE[key]
    start = time.time_ns()
    digest = _hash_file(Path(path), block)
    if _key(os.stat(path), block) == key and start - st.st_mtime_ns > RACY_NS:
        _CACHE[key] = digest
    return digest


def remember(path: Path, block: int | None = None) -> str:
    """Hash a file this process has just written (a new inode nobody else writes into) and cache it,
    however recent its mtime; a rename into place keeps the cache entry (same inode and mtime)."""
    key = _key(os.stat(path), block)
    if key not in _CACHE:
        _CACHE[key] = _hash_file(Path(path), block)
    return _CACHE[key]


def digests(paths: list[Path], written: bool = False) -> list[tuple[str, int | None]]:
    """(digest, block) of each file (`written`: this process just wrote them, see `remember`). Files
    over BIG are hashed in blocks by threads; many small ones (adding up to PARALLEL_BYTES), in threads."""
    paths = [Path(p) for p in paths]
    one = remember if written else sha256_of
    blocks = [block_for(os.stat(p).st_size) for p in paths]
    small = [p for p, b in zip(paths, blocks) if b is None]
    done: dict[Path, str] = {}
    if len(small) > 1 and sum(os.stat(p).st_size for p in small) >= PARALLEL_BYTES:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(len(small), os.cpu_count() or 1, 8)) as pool:
            done.update(zip(small, pool.map(one, small)))
    return [(done[p] if p in done else one(p, b), b) for p, b in zip(paths, blocks)]


def _name(path: Path, base: Path | None) -> str:
    if base is not None and path.is_relative_to(base):
        return str(path.relative_to(base))
    return str(path)


def _record(path: Path, base: Path | None, digest: str, block: int | None) -> dict[str, Any]:
    rec = {"path": _name(path, base), "size": path.stat().st_size, "sha256": digest}
    return {**rec, "block": block} if block else rec


def record(path: Path, base: Path | None = None) -> dict[str, Any]:
    """{"path" (relative to `base` when inside it), "size", "sha256"} of a file, and "block" where it
    is hashed in blocks (files over BIG)."""
    path = Path(path)
    return _record(path, base, *digests([path])[0])


def records(paths: list[Path], base: Path | None = None, written: bool = False) -> list[dict[str, Any]]:
    paths = [Path(p) for p in paths]
    return [_record(p, base, d, b) for p, (d, b) in zip(paths, digests(paths, written))]


def policy_digests(folder: Path) -> dict[str, Any]:
    """What a policy's marker records of the files just written into `folder`: each file's size and
    sha256 ("files") and one hash over them ("hash", the policy's identity; = folder_digest)."""
    folder = Path(folder)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    recs = records(files, folder, written=True)
    h = hashlib.sha256()
    for r in recs:
        h.update(r["path"].encode())
        h.update(r["sha256"].encode())
    return {"hash": h.hexdigest()[:16], "files": recs}


def folder_digest(folder: Path) -> str:
    """One hash over every file of a folder (names and contents), e.g. a policy."""
    folder = Path(folder)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    h = hashlib.sha256()
    for p, (digest, _) in zip(files, digests(files)):
        h.update(str(p.relative_to(folder)).encode())
        h.update(digest.encode())
    return h.hexdigest()[:16]


# ---- checking --------------------------------------------------------------------------------------
def problem(path: Path, rec: dict[str, Any]) -> str | None:
    """What is wrong with a file against its record (missing, size, content), or None."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "missing"
    if size != rec["size"]:
        return f"{size} bytes where its manifest records {rec['size']}"
    if sha256_of(path, rec.get("block")) != rec["sha256"]:
        return "content differs from its manifest (sha256)"
    return None


def problems(recs: list[dict[str, Any]], base: Path) -> list[tuple[Path, str]]:
    """(file, problem) for every record under `base` that does not match; large files hashed in threads."""
    paths = [Path(base) / r["path"] for r in recs]
    present = [p for p, r in zip(paths, recs) if p.is_file() and p.stat().st_size == r["size"]]
    digests(present)  # warms the cache, in threads; problem() reads it
    return [(p, why) for p, r in zip(paths, recs) if (why := problem(p, r)) is not None]


def damaged(path: Path, why: str, repair: str) -> str:
    return f"{path}: {why}; run `{repair}` to recompute it"


def manifest_files(manifest: dict[str, Any], stage_dir: Path, root: Path) -> list[tuple[Path, dict]]:
    """(file, record) of everything a stage manifest vouches for: its output and the files beside it
    (relative to the stage folder) and, for train-step, the new policy's marker (relative to the run)."""
    stage_dir = Path(stage_dir)
    out = [(stage_dir / manifest["output"]["path"], manifest["output"])]
    out += [(stage_dir / r["path"], r) for r in manifest.get("outputs", [])]
    if "policy_marker" in manifest:
        out.append((Path(root) / manifest["policy_marker"]["path"], manifest["policy_marker"]))
    return out


def vouched(path: Path, man: Path, root: Path, repair: str) -> str | None:
    """None when `man` (the manifest of the stage folder holding `path`) is whole and records `path`
    with its size and sha256; else one line naming what is wrong and `repair`. For readers of one
    file of a stage (report, compare, eval's training table). A stage folder without manifests (made
    by hand) is taken as it is."""
    if not Path(man).parent.is_dir():
        return None
    m, why = read_manifest(man)
    if m is None:
        return f"{man}: {why}; run `{repair}`"
    rec = {p: r for p, r in manifest_files(m, Path(man).parent.parent, root)}.get(Path(path))
    if rec is None:
        return f"{path}: not recorded in {man}; run `{repair}`"
    why = problem(path, rec)
    return damaged(path, why, repair) if why else None


def pruned(path: Path, root: Path) -> bool:
    """A file of a train state or policy folder that checkpoint retention removed (the whole folder
    is gone), which is no damage."""
    rel = Path(path).relative_to(root).parts
    if len(rel) >= 2 and re.fullmatch(r"policy-\d{3}", rel[0]):
        return not (Path(root) / rel[0]).exists()
    if len(rel) >= 4 and rel[1:3] == ("train", "state"):
        return not (Path(root) / Path(*rel[:3])).exists()
    return False


def repair_command(rel: str | Path, root: Path | None = None) -> str:
    """The command that rewrites a file of a run (its path relative to the run folder); with `root`,
    aimed at that run (`--run ROOT`), so that pasting it repairs the right one."""
    parts = Path(rel).parts
    if not parts or parts[0] in ("prompts", "eval-sets", "policy-000", "config.toml"):
        args = "prepare"
    elif re.fullmatch(r"policy-\d{3}", parts[0]):
        args = f"train-step --round {int(parts[0][7:])}"
    elif re.fullmatch(r"round-\d{3}", parts[0]) and len(parts) > 1 and parts[1] in STAGE_WRITERS:
        args = f"{STAGE_WRITERS[parts[1]]} --round {int(parts[0][6:])}"
    else:
        args = "round"
    return f"scope {args}" if root is None else run_command(root, args)


def run_command(root: Path, args: str) -> str:
    """`scope ARGS --run ROOT` (the folder as a path, quoted for a shell when it needs it)."""
    import shlex

    return f"scope {args} --run {shlex.quote(str(root))}"


# ---- reading manifests -------------------------------------------------------------------------------
def is_record(x: Any) -> bool:
    """{"path": str, "size": int, "sha256": str} and, where present, "block": a positive int."""
    block = x.get("block", 1) if isinstance(x, dict) else None
    return (isinstance(x, dict) and isinstance(x.get("path"), str) and type(x.get("size")) is int
            and isinstance(x.get("sha256"), str) and type(block) is int and block > 0)


def record_lists_problem(data: dict[str, Any], *keys: str) -> str | None:
    for key in keys:
        if key in data and not (isinstance(data[key], list) and all(is_record(x) for x in data[key])):
            return f"'{key}' is not a list of {{path, size, sha256}}"
    return None


def read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """A stage manifest, or (None, why not). One without a sha256 for its output (an older version's,
    or damaged) is not a manifest: its writer recomputes the shard, to the same bytes."""
    data, why = json_object(path)
    if data is None:
        return None, why
    if not is_record(data.get("output")):
        return None, "no 'output' {path, size, sha256}"
    if not isinstance(data.get("config_hash"), str):
        return None, "no 'config_hash'"
    num = data.get("num_shards", 1)
    if type(num) is not int or num < 1:
        return None, f"'num_shards' is {num!r}, expected a positive integer"
    if "policy_marker" in data and not is_record(data["policy_marker"]):
        return None, "'policy_marker' is not {path, size, sha256}"
    why = record_lists_problem(data, "inputs", "outputs")
    return (None, why) if why else (data, None)
