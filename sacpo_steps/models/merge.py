"""The merge step: theta_q = (1 - q) * theta_a + q * theta_b, every q of a pair in one pass.

P-SACPO merges the reward-aligned model (a) with its over-safe stage-2 child (b);
the naive-merge baseline merges DPO(H) and DPO(S), both trained from SFT.

Memory stays near one chunk whatever the model size: the output files mirror
parent a's shards, and since every output tensor has its parent's dtype and shape,
each output header is known before any weight is read. So each output shard is
written as a safetensors header followed by tensor bytes streamed in order, chunk
by chunk (rows of a tensor), for all q at once. Arithmetic is float32 (float64
parents stay float64), cast back to the parents' dtype on write.

Endpoints are exact: q = 0 and q = 1 write the parent's bytes unchanged. The
float formula (1 - q) * a + q * b alone would not be bitwise exact there:
-0.0 + 0.0 is +0.0, and a NaN or inf in the other parent leaks through 0 * x.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import IO, Any

from sacpo_steps.core.errors import InputError
from sacpo_steps.core.fileio import atomic_output, read_json, setup_logging
from sacpo_steps.core.lineage import make_record, model_input
from sacpo_steps.models.folders import (
    LINEAGE_FILE,
    check_model_dir,
    read_lineage,
    set_threads,
    write_model_card,
)

log = logging.getLogger("sacpo.merge")

INDEX_FILE = "model.safetensors.index.json"
# Bytes of parent data per read. safe_open maps the whole file and its tensors are
# views of that mapping: every page touched counts in our RSS until the handle and
# all tensors read from it are gone. So a handle and its tensors live for one chunk,
# and peak memory is a few chunks, not a shard per parent.
CHUNK_BYTES = 16 << 20
# Config fields that say how a model was saved or run, not what it is.
CONFIG_IGNORED = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "torch_dtype", "dtype",
    "transformers_version", "use_cache",
})
# Checked first, so a different architecture is reported as such.
CONFIG_FIRST = ("architectures", "model_type")
# Files that define token ids; a merge of models with different ids is meaningless.
TOKENIZER_CONTENT = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                     "added_tokens.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack",
                   ".gguf", ".onnx")
NOT_COPIED = frozenset({"README.md", LINEAGE_FILE})
# safetensors dtype -> bytes per element (the format's own table).
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
# Averaged; any other dtype (integers, bools, float8) must be equal in both parents.
MERGED_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offsets into the file's data section
    end: int
    file: Path

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class Weights:
    """A model folder's safetensors layout: shards in file order, tensors in offset order."""

    folder: Path
    shards: list[tuple[Path, list[TensorInfo]]]
    index: dict[str, Any] | None  # model.safetensors.index.json, when sharded

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for _, tensors in self.shards for t in tensors}


def read_header(path: Path) -> list[TensorInfo]:
    """Parse and check a safetensors header; offsets are needed to stream in file order."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise InputError("not a safetensors file (shorter than 8 bytes)", path=path)
            (size,) = struct.unpack("<Q", raw)
            file_size = path.stat().st_size
            if size > min(MAX_HEADER_BYTES, file_size - 8):
                raise InputError(f"not a safetensors file (header length {size})", path=path)
            header = json.loads(fh.read(size))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"safetensors header is not valid JSON ({exc})", path=path) from None
    if not isinstance(header, dict):
        raise InputError("safetensors header is not a JSON object", path=path)
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise InputError("malformed header entry", path=path, field=name) from None
        if dtype not in DTYPE_BYTES:
            raise InputError(f"unsupported dtype {dtype}", path=path, field=name)
        if end - start != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise InputError(f"data_offsets {[start, end]} do not fit shape {list(shape)} "
                             f"and dtype {dtype}", path=path, field=name)
        tensors.append(TensorInfo(name, dtype, shape, int(start), int(end), path))
    tensors.sort(key=lambda t: (t.start, t.end))
    position = 0
    for t in tensors:
        if t.start != position:
            raise InputError("tensor data overlaps or leaves a hole (corrupt file)",
                             path=path, field=t.name)
        position = t.end
    if position != file_size - 8 - size:
        raise InputError(f"data section is {file_size - 8 - size} bytes, tensors need "
                         f"{position} (truncated or corrupt file)", path=path)
    _check_opens(path, {t.name for t in tensors})
    return tensors


def _check_opens(path: Path, names: set[str]) -> None:
    """Let safetensors itself agree that the file is valid before we write anything."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
    except Exception as exc:  # SafetensorError is not importable from a stable place
        raise InputError(f"safetensors cannot open it ({exc})", path=path) from None
    if keys != names:
        raise InputError("safetensors reads other tensor names than its header lists",
                         path=path)


def read_weights(folder: str | Path, *, role: str) -> Weights:
    """The safetensors shards of a model folder, from its index or its single file."""
    folder = check_model_dir(folder, role=role)
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if (not isinstance(weight_map, dict) or not weight_map
                or not all(isinstance(f, str) for f in weight_map.values())):
            raise InputError("index has no weight_map of tensor name -> shard file",
                             path=index_path, field="weight_map")
        files = sorted(set(weight_map.values()))
        shards = []
        for file_name in files:
            shard = folder / str(file_name)
            if not shard.is_file():
                raise InputError(f"weight_map names a missing shard {file_name}",
                                 path=index_path, field="weight_map")
            tensors = read_header(shard)
            listed = {n for n, f in weight_map.items() if f == file_name}
            found = {t.name for t in tensors}
            for name in sorted(listed - found):
                raise InputError(f"tensor listed in {INDEX_FILE} is missing from the shard",
                                 path=shard, field=name)
            for name in sorted(found - listed):
                raise InputError(f"tensor in the shard is not in {INDEX_FILE}",
                                 path=shard, field=name)
            shards.append((shard, tensors))
        return Weights(folder, shards, index)
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise InputError(f"{len(files)} safetensors files but no {INDEX_FILE}",
                         path=folder, field=INDEX_FILE)
    return Weights(folder, [(files[0], read_header(files[0]))], None)


def _strip_ignored(config: Any) -> Any:
    if isinstance(config, dict):
        return {k: _strip_ignored(v) for k, v in config.items() if k not in CONFIG_IGNORED}
    return config


def compare_configs(a: Path, b: Path) -> None:
    """Refuse parents whose config.json differs beyond how they were saved."""
    ca = _strip_ignored(read_json(a / "config.json"))
    cb = _strip_ignored(read_json(b / "config.json"))
    keys = sorted(set(ca) | set(cb), key=lambda k: (k not in CONFIG_FIRST, k))
    missing = "<missing>"
    for key in keys:
        va, vb = ca.get(key, missing), cb.get(key, missing)
        if va != vb:
            raise InputError(f"differs from parent a's ({va!r} in {a}, {vb!r} here): "
                             "the parents are not the same architecture",
                             path=b / "config.json", field=key)


def compare_tokenizers(a: Path, b: Path) -> None:
    """Refuse parents whose token ids could differ."""
    for name in TOKENIZER_CONTENT:
        fa, fb = a / name, b / name
        if not fa.is_file() and not fb.is_file():
            continue
        if fa.is_file() != fb.is_file():
            have = a if fa.is_file() else b
            raise InputError(f"only one parent has {name} (present in {have}): "
                             "different tokenizers", path=b, field=name)
        da, db = fa.read_bytes(), fb.read_bytes()
        if da == db:
            continue
        if name.endswith(".json"):
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                if json.loads(da) == json.loads(db):
                    continue  # same content, other formatting
        raise InputError(f"differs from parent a's {fa}: different tokenizers",
                         path=fb, field=name)


def compare_weights(a: Weights, b: Weights) -> None:
    """Same tensor names (tied weights are absent on both sides), dtypes and shapes."""
    ta, tb = a.by_name(), b.by_name()
    for name in sorted(set(ta) - set(tb)):
        raise InputError(f"tensor of parent a ({ta[name].file}) is missing here "
                         f"({len(set(ta) - set(tb))} missing in all)", path=b.folder, field=name)
    for name in sorted(set(tb) - set(ta)):
        raise InputError(f"tensor is missing from parent a ({a.folder}) "
                         f"({len(set(tb) - set(ta))} missing in all)", path=tb[name].file,
                         field=name)
    for name, x in ta.items():
        y = tb[name]
        if x.shape != y.shape:
            raise InputError(f"shape {list(y.shape)} differs from parent a's {list(x.shape)} "
                             f"({x.file})", path=y.file, field=name)
        if x.dtype != y.dtype:
            raise InputError(f"dtype {y.dtype} differs from parent a's {x.dtype} ({x.file})",
                             path=y.file, field=name)


def check_qs(qs: Sequence[float], outs: Sequence[str | Path],
             names: Sequence[str] | None) -> None:
    if not qs:
        raise InputError("no q given", field="q")
    if len(qs) != len(outs):
        raise InputError(f"{len(qs)} q values but {len(outs)} output folders: give one --out "
                         "per --q, in the same order", field="q/out")
    if names is not None and len(names) != len(outs):
        raise InputError(f"{len(names)} names but {len(outs)} output folders", field="name")
    for q in qs:
        if not (isinstance(q, int | float) and math.isfinite(q) and 0.0 <= q <= 1.0):
            raise InputError(f"q must be a number in [0, 1], not {q!r}", field="q")
    if len(set(qs)) != len(qs):
        raise InputError(f"duplicate q in {list(qs)}", field="q")


def check_outs(outs: Sequence[str | Path], parents: Sequence[Path]) -> list[Path]:
    """Distinct outputs that neither are, contain nor lie inside a parent."""
    resolved = [Path(o).resolve() for o in outs]
    if len(set(resolved)) != len(resolved):
        raise InputError(f"duplicate output folder in {[str(o) for o in outs]}", field="out")
    for out, given in zip(resolved, outs, strict=True):
        for parent in (p.resolve() for p in parents):
            if out == parent or out in parent.parents or parent in out.parents:
                raise InputError(f"output folder overlaps the parent {parent}",
                                 path=given, field="out")
    return [Path(o) for o in outs]


def _header_bytes(tensors: Sequence[TensorInfo]) -> bytes:
    """A safetensors header as the library writes it: compact JSON padded to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    position = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape),
                          "data_offsets": [position, position + t.nbytes]}
        position += t.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class _Scratch:
    """Reusable flat buffers, so chunks do not allocate (and fault in) fresh memory."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, Any], Any] = {}

    def get(self, key: str, dtype: Any, numel: int) -> Any:
        import torch

        buf = self._buffers.get((key, dtype))
        if buf is None or buf.numel() < numel:
            buf = self._buffers[(key, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


def _row_chunks(t: TensorInfo) -> Iterator[slice | EllipsisType]:
    """Row ranges of about CHUNK_BYTES (a 0-dim tensor is one chunk)."""
    if not t.shape:
        yield Ellipsis
        return
    rows = t.shape[0]
    row_bytes = t.nbytes // rows if rows else 0
    step = max(1, CHUNK_BYTES // row_bytes) if row_bytes else max(rows, 1)
    for r0 in range(0, max(rows, 1), step):
        yield slice(r0, min(r0 + step, rows))


def _write(fh: IO[bytes], tensor: Any) -> None:
    import torch

    fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _merge_tensor(ta: TensorInfo, tb: TensorInfo, qs: Sequence[float],
                  files: Sequence[IO[bytes]], scratch: _Scratch) -> None:
    """Stream one tensor into every output, chunk by chunk."""
    import torch
    from safetensors import safe_open

    merged = ta.dtype in MERGED_DTYPES
    for rows in _row_chunks(ta):
        with safe_open(ta.file, framework="pt") as fa, safe_open(tb.file, framework="pt") as fb:
            ca = fa.get_slice(ta.name)[rows].contiguous()
            cb = fb.get_slice(tb.name)[rows].contiguous()
        if not merged:
            if not torch.equal(ca, cb):
                raise InputError(f"{ta.dtype} tensor differs between the parents and cannot be "
                                 f"averaged ({ta.file})", path=tb.file, field=ta.name)
            for fh in files:
                _write(fh, ca)
            continue
        n = ca.numel()
        compute = torch.float64 if ca.dtype == torch.float64 else torch.float32
        if ca.dtype == compute:
            a32, b32 = ca.reshape(-1), cb.reshape(-1)
        else:
            a32 = scratch.get("a", compute, n).copy_(ca.reshape(-1))
            b32 = scratch.get("b", compute, n).copy_(cb.reshape(-1))
        for q, fh in zip(qs, files, strict=True):
            if q == 0.0:
                _write(fh, ca)
            elif q == 1.0:
                _write(fh, cb)
            else:
                out = torch.mul(a32, 1.0 - q, out=scratch.get("out", compute, n))
                out.add_(b32, alpha=q)
                if ca.dtype != compute:
                    out = scratch.get("cast", ca.dtype, n).copy_(out)
                _write(fh, out)


def _progress(total: int) -> Any:
    """A tqdm bar over bytes of parent a, silent when stderr is not a terminal."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="merge", file=sys.stderr,
                disable=None, leave=False)


def _write_index(a: Weights, out: Path) -> None:
    """Mirror a's index, with sizes counted from what we wrote."""
    assert a.index is not None
    tensors = [t for _, ts in a.shards for t in ts]
    metadata = dict(a.index.get("metadata") or {})
    metadata["total_size"] = sum(t.nbytes for t in tensors)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(math.prod(t.shape) for t in tensors)
    weight_map = {t.name: shard.name for shard, ts in a.shards for t in ts}
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n",
                                  encoding="utf-8")


def _copy_side_files(src: Path, out: Path) -> None:
    """Config, generation config and tokenizer files come from parent a."""
    for item in sorted(src.iterdir()):
        if (not item.is_file() or item.name.startswith(".") or item.name in NOT_COPIED
                or item.name.endswith(".index.json") or item.name.endswith(WEIGHT_SUFFIXES)):
            continue
        shutil.copy2(item, out / item.name)


def _dtype_name(a: Weights) -> str:
    dtypes = sorted({MERGED_DTYPES.get(t.dtype, t.dtype) for _, ts in a.shards for t in ts})
    return "+".join(dtypes)


def merge(parent_a: str | Path, parent_b: str | Path, qs: Sequence[float],
          outs: Sequence[str | Path], *, name_a: str | None = None, name_b: str | None = None,
          names: Sequence[str] | None = None, threads: int | None = None) -> list[Path]:
    """Write (1 - q) * a + q * b for each q into its own folder; all of them or none."""
    qs = [float(q) if isinstance(q, int | float) else q for q in qs]
    check_qs(qs, outs, names)
    a = read_weights(parent_a, role="parent a")
    b = read_weights(parent_b, role="parent b")
    outs = check_outs(outs, [a.folder, b.folder])
    name_a = name_a or a.folder.resolve().name
    name_b = name_b or b.folder.resolve().name
    names = list(names) if names is not None else [Path(o).resolve().name for o in outs]
    compare_configs(a.folder, b.folder)
    compare_tokenizers(a.folder, b.folder)
    compare_weights(a, b)
    # The arithmetic is memory-bound and tiny next to the I/O; extra threads only
    # contend with other jobs for the cores (measured: 1 thread ~5x faster than 2 on 2 busy cores).
    set_threads(threads or 1)
    tb = b.by_name()
    total = sum(t.nbytes for _, ts in a.shards for t in ts)
    dtype = _dtype_name(a)
    compute = "float64" if "F64" in {t.dtype for t in tb.values()} else "float32"
    log.info("merging %s (a) and %s (b): %d tensors, %.1f MiB %s in %d shard(s), q = %s",
             name_a, name_b, len(tb), total / 2**20, dtype, len(a.shards), qs)
    started = time.monotonic()
    parents = {"parent_a": model_input(a.folder, name_a), "parent_b": model_input(b.folder, name_b)}
    scratch = _Scratch()
    with contextlib.ExitStack() as outputs:
        tmps = [outputs.enter_context(atomic_output(o, is_dir=True)) for o in outs]
        with _progress(total) as bar:
            for i, (shard, tensors) in enumerate(a.shards, start=1):
                header = _header_bytes(tensors)
                with contextlib.ExitStack() as files:
                    handles = [files.enter_context(open(tmp / shard.name, "wb"))
                               for tmp in tmps]
                    for fh in handles:
                        fh.write(header)
                    for t in tensors:
                        _merge_tensor(t, tb[t.name], qs, handles, scratch)
                        bar.update(t.nbytes)
                    for fh in handles:
                        if fh.tell() != len(header) + sum(t.nbytes for t in tensors):
                            raise RuntimeError(f"wrote {fh.tell()} bytes to {fh.name}, "
                                               "expected otherwise")
                log.info("shard %d/%d %s done (%.1f s)", i, len(a.shards), shard.name,
                         time.monotonic() - started)
        lineage = read_lineage(a.folder).get("lineage", [])
        for tmp, out_name, q in zip(tmps, names, qs, strict=True):
            if a.index is not None:
                _write_index(a, tmp)
            _copy_side_files(a.folder, tmp)
            stage = {"name": out_name, "parent": name_a, "parent_b": name_b, "loss": "merge",
                     "q": q}
            write_model_card(tmp, {
                "name": out_name,
                "method": "merge",
                "description": (f"Linear weight merge (1 - q) * {name_a} + q * {name_b} with "
                                f"q = {q}, computed in {compute} and saved as {dtype}."),
                "lineage": [*lineage, stage],
                "merge": {"parent_a": name_a, "parent_b": name_b, "q": q, "dtype": dtype},
                "record": make_record("merge", name=out_name, inputs=parents, settings={
                    "q": q, "dtype": dtype, "compute": compute}),
            })
    log.info("merged %d output(s) in %.1f s wall", len(outs), time.monotonic() - started)
    return [Path(o) for o in outs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sacpo_steps merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True, help="parent a (weight 1 - q)")
    parser.add_argument("--b", required=True, help="parent b (weight q)")
    parser.add_argument("--name-a", help="name of parent a in the lineage (default: folder)")
    parser.add_argument("--name-b", help="name of parent b in the lineage (default: folder)")
    parser.add_argument("--q", type=float, action="append", required=True,
                        help="merge weight of b; repeat, one per --out, in the same order")
    parser.add_argument("--out", action="append", required=True, help="output folder per q")
    parser.add_argument("--name", action="append",
                        help="model name per output (default: the output folder's name)")
    parser.add_argument("--threads", type=int, help="torch threads (default 1: I/O-bound)")
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    merge(args.a, args.b, args.q, args.out, name_a=args.name_a, name_b=args.name_b,
          names=args.name, threads=args.threads)
