"""Multi-host helpers: which work is this host's, and putting the pieces back.

On a pod slice every host runs the same program. Work is split in two ways:
`host_shard` / `shard_range` give each host a contiguous block of a list, and
`host_jobs` / `run_dealt` deal numbered jobs round robin (job j to host
j % process_count). The generation stages (revise, label) deal their
fixed-size chunks with `run_dealt`; every chunk's randomness comes from its
index alone, so the records do not depend on which host made them. Results come
back together with `gather_records` (over the JAX collectives, so hosts need
no shared file system), in job or process order, so the merged list is the
single-host list: nothing twice, nothing lost, same order.

With one process all of this degrades to the identity, so stages call it
unconditionally. Start-up itself (`jax.distributed.initialize`) lives in
`sharding.maybe_initialize_distributed`.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional, Sequence

import jax
import numpy as np

from cai_jax.utils import InputError


def process_index() -> int:
  return jax.process_index()


def process_count() -> int:
  return jax.process_count()


def is_main() -> bool:
  """True on the process that writes shared outputs (DONE markers, merged files)."""
  return jax.process_index() == 0


def _index_count(index: Optional[int], count: Optional[int]) -> tuple[int, int]:
  index = jax.process_index() if index is None else int(index)
  count = jax.process_count() if count is None else int(count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"host shard index {index} out of range for {count} hosts")
  return index, count


def shard_range(n: int, index: Optional[int] = None, count: Optional[int] = None) -> range:
  """This host's contiguous block of range(n); block sizes differ by at most one."""
  index, count = _index_count(index, count)
  base, extra = divmod(int(n), count)
  start = index * base + min(index, extra)
  return range(start, start + base + (1 if index < extra else 0))


def host_shard(items: Sequence[Any], index: Optional[int] = None,
               count: Optional[int] = None) -> list:
  """This host's block of `items` (all of them with one process)."""
  r = shard_range(len(items), index, count)
  return list(items[r.start:r.stop])


def sync(name: str) -> None:
  """Barrier across hosts (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every host's `data`, in process order, on every host."""
  if jax.process_count() == 1:
    return [bytes(data)]
  from jax.experimental import multihost_utils
  n = np.asarray([len(data)], np.int64)
  sizes = np.asarray(multihost_utils.process_allgather(n)).reshape(-1)
  # Collectives need equal shapes: pad every host's bytes to the longest.
  buf = np.zeros((max(int(sizes.max()), 1),), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  allbuf = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [allbuf[i, :int(s)].tobytes() for i, s in enumerate(sizes)]


def gather_records(records: Sequence[Any]) -> list:
  """Concatenates every host's (JSON-serialisable) records in process order.

  Each host passes the results for its `host_shard`; every host gets the full
  list, equal to what one process would have produced.
  """
  payload = json.dumps(list(records), ensure_ascii=False).encode("utf-8")
  out = []
  for chunk in allgather_bytes(payload):
    out.extend(json.loads(chunk.decode("utf-8")))
  return out


def from_main(obj: Any) -> Any:
  """Process 0's (JSON-serialisable) `obj` on every host.

  For decisions every host must take alike when only the main host can see the
  evidence, e.g. a stage's DONE marker on a disk the other hosts do not share.
  """
  if jax.process_count() == 1:
    return obj
  return gather_records([obj])[0]


def check_same(obj: Any, what: str) -> None:
  """Raises InputError unless every host passes an equal (JSON-serialisable) `obj`.

  Dealing work to hosts is only right when they agree on the work list.
  """
  if jax.process_count() == 1:
    return
  key = json.dumps(obj, sort_keys=True, ensure_ascii=False)
  digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
  digests = gather_records([digest])
  bad = [i for i, d in enumerate(digests) if d != digests[0]]
  if bad:
    raise InputError(f"host {bad[0]}: its {what} differs from host 0's; give every host the "
                     "same config, data and model paths")


def host_jobs(n: int, index: Optional[int] = None, count: Optional[int] = None) -> range:
  """Job indices dealt to this host: j with j % count == index (all with one process).

  Round robin rather than blocks, so kinds of work that follow each other in a
  job list (expensive red-team chunks, then cheap helpfulness chunks) spread
  over the hosts.
  """
  index, count = _index_count(index, count)
  return range(index, int(n), count)


def run_dealt(n: int, fn) -> list:
  """Runs fn(j) for this host's `host_jobs(n)`; returns all n results in job order.

  Results must be JSON-serialisable; they come back on every host through
  `gather_records` (no shared file system needed). Each job index must arrive
  exactly once: a duplicate or a gap is an error, never a silent loss. An
  exception on one host is reported on every host (re-raised where it
  happened) instead of leaving the others waiting in the collective.
  """
  if jax.process_count() == 1:
    return [fn(j) for j in range(int(n))]
  results, error = [], None
  try:
    for j in host_jobs(n):
      results.append([j, fn(j)])
  except Exception as e:  # reported to the other hosts, then re-raised below
    error = e
  pieces = gather_records([{"host": jax.process_index(), "results": results,
                            "error": None if error is None else f"{type(error).__name__}: {error}"}])
  if error is not None:
    raise error
  failed = [p for p in pieces if p["error"]]
  if failed:
    raise RuntimeError(f"host {failed[0]['host']} failed: {failed[0]['error']}")
  out, seen = [None] * int(n), set()
  for p in pieces:
    for j, r in p["results"]:
      if j in seen or not 0 <= j < n:
        raise RuntimeError(f"job {j} returned twice or out of range (host {p['host']})")
      seen.add(j)
      out[j] = r
  if len(seen) != n:
    missing = sorted(set(range(int(n))) - seen)
    raise RuntimeError(f"jobs {missing[:5]} returned by no host")
  return out


def to_host(tree):
  """Global jax.Arrays (sharded over all hosts) -> full numpy arrays on every host."""
  if jax.process_count() == 1:
    return jax.tree_util.tree_map(np.asarray, tree)
  from jax.experimental import multihost_utils
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(one, tree)


def host_batch_slice(mesh, global_batch_size: int, ndim: int = 2, rules=None) -> slice:
  """Rows of a global batch this host must supply to `sharding.make_global_batch`.

  Read off the batch sharding itself (which devices hold which rows), so it is
  right for any mesh layout; raises if this host's rows are not one contiguous
  block (a mesh whose batch axes interleave hosts).
  """
  from cai_jax import sharding
  rules = sharding.DEFAULT_RULES if rules is None else rules
  s = sharding.batch_sharding(mesh, ndim, rules)
  shape = (int(global_batch_size),) + (1,) * (ndim - 1)
  rows = set()
  for idx in s.addressable_devices_indices_map(shape).values():
    r = idx[0]
    rows.update(range(*r.indices(global_batch_size)))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f"host {jax.process_index()} holds non-contiguous batch rows "
                     f"{sorted(rows)}; order the mesh devices by process")
  return slice(lo, hi)
