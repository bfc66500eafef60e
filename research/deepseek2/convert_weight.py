"""Convert DeepSeek-V2 / V2-Lite weights between Hugging Face and this MindSpore model, tensor by tensor.

Hugging Face -> MindSpore (names from weight_map.NAME_MAP, routed experts stacked to (E, out, in)):
    python research/deepseek2/convert_weight.py --torch_ckpt_path HF_DIR --mindspore_ckpt_path OUT_DIR [--dtype bf16]
      a folder (any path not ending in .ckpt/.safetensors): MindSpore safetensors, one shard per input shard,
      model-0000k-of-0000n.safetensors + param_name_map.json ({parameter: shard}, MindFormers' flat map). This is
      what MindFormers 1.9 loads with `load_ckpt_format: safetensors` and `load_checkpoint: OUT_DIR` (it reads every
      *.safetensors of the folder with mindspore.load_checkpoint(f, format="safetensors")).
    python research/deepseek2/convert_weight.py --torch_ckpt_path HF_DIR --mindspore_ckpt_path OUT.safetensors
      one MindSpore safetensors file.
    python research/deepseek2/convert_weight.py --torch_ckpt_path HF_DIR --mindspore_ckpt_path OUT.ckpt
      one MindSpore .ckpt (the upstream README's form; byte-identical to mindspore.save_checkpoint).
    python research/deepseek2/convert_weight.py --torch_ckpt_path HF_DIR --mindspore_ckpt_path OUT_DIR --format ckpt
      the older folder output: deepseek2-0000k-of-0000n.ckpt + deepseek2.ckpt.index.json (for load_ckpt_format: ckpt
      tools; the loaders here read both).
    An existing output folder keeps its other files, but one that already holds other checkpoint files (*.safetensors,
    *.ckpt, an index) this run would not overwrite is refused, and so is a Hugging Face folder (config.json).
MindSpore -> Hugging Face (safetensors shards + model.safetensors.index.json + config.json):
    python research/deepseek2/convert_weight.py --reverse --mindspore_ckpt_path IN \
        --torch_ckpt_path OUT_HF_DIR --config config.json|model.yaml [--dtype bf16] [--max_shard_size 5GB]
      IN: a .safetensors or .ckpt file, a folder of either, or its index json (checkpoints.open_checkpoint).
Quantized (weight-only, round to nearest; msModelSlim's W8A16 / W4A16 folder layout, quantization/convert.py):
    python research/deepseek2/convert_weight.py --quantize int8 --torch_ckpt_path HF_DIR --mindspore_ckpt_path OUT
    python research/deepseek2/convert_weight.py --quantize int4 [--group_size 128] [--modules_to_not_convert a,b] ...
    python research/deepseek2/convert_weight.py --quantize int8 --reverse --mindspore_ckpt_path IN \
        --torch_ckpt_path OUT --config config.json|model.yaml
      a bad --quantize / --group_size / --modules_to_not_convert (or a group size that does not divide a weight's
      inputs) exits with status 2.

Everything is checked before the output is put in place (missing, unknown and mis-shaped tensors, truncated files);
on any error the command names the tensor/file, leaves no output behind (files and folders are staged, fileio) and
exits with status 1. dtype: --dtype casts (round to nearest-even); without it every tensor keeps its bits.
Memory: one tensor at a time, plus one layer's stacked routed experts while they are assembled. Safetensors are
written at offsets planned from the headers (checkpoints/safetensors_file.SafetensorsWriter), so tensors may arrive in
any order; a .ckpt input of up to 1 GiB is parsed whole by MindSpore, larger ones are streamed
(checkpoints/ckpt_file).
"""
import argparse
import json
import os
import re
import sys

from mindformers.tools.logger import logger

from research.deepseek2.checkpoints.arrays import cast_array, describe, dtype_name, np_dtype
from research.deepseek2.checkpoints.check import compare, raise_problems
from research.deepseek2.checkpoints.checkpoint import (HF_INDEX_NAME, MS_INDEX_NAME, MS_NAME_MAP, MindSporeCheckpoint,
                                                       is_hf_folder)
from research.deepseek2.checkpoints.ckpt_file import CkptWriter
from research.deepseek2.checkpoints.hf_folder import HFCheckpoint
from research.deepseek2.checkpoints.safetensors_file import (SafetensorsWriter, ShardedSafetensorsWriter,
                                                           plan_shards)
from research.deepseek2.checkpoints.weight_map import (NAME_MAP, expected_hf_shapes, expected_ms_shapes, hf_to_ms,
                                                       is_stacked, ms_to_hf)
from research.deepseek2.deepseek2_config import DeepseekV2Config
from research.deepseek2.dtypes import DTYPE_NAMES
from research.deepseek2.errors import CheckpointError
from research.deepseek2.fileio import StagedDir, StagedFile
from research.deepseek2.planning.inventory import buffers as declared_buffers

__all__ = ["load_model_config", "parse_size", "convert_hf_to_ms", "convert_ms_to_hf", "name_map_markdown", "main"]


# ---------------------------------------------------------------------------------------------------- helpers
def load_model_config(path: str) -> DeepseekV2Config:
    """DeepseekV2Config from a HF folder (its config.json), a config.json, or a MindFormers YAML
    (``model: {model_config: {...}}``)."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: config file not found")
    if path.endswith((".yaml", ".yml")):
        import yaml  # pylint: disable=import-outside-toplevel
        with open(path) as f:
            data = yaml.safe_load(f)
        try:
            fields = dict(data["model"]["model_config"])
        except (KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: expected the MindFormers layout model: {{model_config: {{...}}}}") from err
        fields.pop("type", None)
    else:
        try:
            with open(path) as f:
                fields = json.load(f)
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    try:
        return DeepseekV2Config(**fields)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: {err}") from err


def parse_size(text) -> int:
    """'5GB' (10^9), '2GiB' (2^30), '500MB', '64KiB', or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
    if not match:
        raise ValueError(f"--max_shard_size: cannot read {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit or "_"))


OUTPUT_FORMATS = ("safetensors", "ckpt")
# the metadata MindSpore's save_checkpoint(format="safetensors") writes ("remove_redundancy": the full weights, not a
# deduplicated rank's share; MindFormers warns about a file without it)
MS_SAFETENSORS_METADATA = {"format": "ms", "remove_redundancy": "False"}


def _output_layout(path: str, fmt=None):
    """(is a folder, format) of an output path: ``X.ckpt`` / ``X.safetensors`` one file of that format; anything else
    (an existing folder, a path ending in '/', a name without those suffixes) a folder of ``fmt`` shards, safetensors
    by default. ``fmt`` contradicting a file's suffix is refused."""
    if fmt is not None and fmt not in OUTPUT_FORMATS:
        raise CheckpointError(f"--format {fmt!r}: expected one of {', '.join(OUTPUT_FORMATS)}")
    if not (os.path.isdir(path) or path.endswith(("/", os.sep))):
        for suffix in OUTPUT_FORMATS:
            if path.endswith("." + suffix):
                if fmt not in (None, suffix):
                    raise CheckpointError(f"--mindspore_ckpt_path {path!r} is a .{suffix} file but --format is "
                                          f"{fmt}: drop --format, or name a folder for {fmt} shards")
                return False, suffix
    return True, fmt or "safetensors"


def _plan_ms_shards(hf: HFCheckpoint, config, dtype) -> list:
    """[[(MindSpore name, dtype, shape), ...] per output shard]: one per input file that ends a parameter, in model
    order inside it, as ``HFCheckpoint.iter_parameters`` yields them (a stack goes with the input file of its last
    expert row). Empty groups are left out. The dtype is ``dtype`` or the source's (a stack's: expert 0's, as it is
    assembled)."""
    out_dtype = np_dtype(dtype) if dtype else None
    rows, owner = hf.plan(config)
    shapes = expected_ms_shapes(config)
    groups = [[] for _ in hf.files]
    for name, hf_names in rows.items():
        stored = hf.tensors[hf_names[0]].dtype
        groups[owner[name]].append((name, out_dtype if out_dtype is not None else stored, tuple(shapes[name])))
    return [group for group in groups if group]


def _check_output_folder(path: str, keep: set):
    """Refuse an output folder that is a Hugging Face folder, or that holds checkpoint files (shards, indexes) this
    conversion would not overwrite: MindFormers loads every ``*.safetensors`` (``*.ckpt``) of a folder, and
    ``MindSporeCheckpoint`` would find shards of two conversions."""
    if not os.path.isdir(path):
        return
    if is_hf_folder(path):
        raise CheckpointError(f"--mindspore_ckpt_path {path}: a Hugging Face folder (it has config.json); write the "
                              f"MindSpore checkpoint to another folder")
    stale = sorted(n for n in os.listdir(path) if n not in keep
                   and (n.endswith((".safetensors", ".ckpt")) or n in (MS_NAME_MAP, MS_INDEX_NAME)))
    if stale:
        raise CheckpointError(f"--mindspore_ckpt_path {path}: holds checkpoint files this conversion would not "
                              f"replace ({describe(stale, 5)}); MindFormers would load them with the new shards: "
                              f"remove them or choose another folder")


def _check_complete(written: dict, expected: dict, where: str):
    missing = sorted(set(expected) - set(written))
    if missing:
        raise CheckpointError(f"{where}: {len(missing)} parameter(s) were not produced: {missing[:10]}")
    for name, shape in expected.items():
        if tuple(written[name]) != tuple(shape):
            raise CheckpointError(f"{where}: parameter {name!r} has shape {tuple(written[name])}, "
                                  f"expected {tuple(shape)}")


# ---------------------------------------------------------------------------------------------------- HF -> MS
def _writer(path: str, fmt: str, entries):
    """A writer for one output shard; ``entries`` [(name, dtype, shape)] plan a safetensors file's layout."""
    if fmt == "safetensors":
        return SafetensorsWriter(path, entries, MS_SAFETENSORS_METADATA)
    return CkptWriter(path, atomic=False)


def convert_hf_to_ms(hf_dir: str, out_path: str, dtype=None, config=None, progress: bool = True,
                     fmt=None) -> dict:
    """Convert a Hugging Face DeepSeek-V2 folder to a MindSpore checkpoint (MindSpore names, experts stacked).

    Args:
        hf_dir: folder with config.json and model.safetensors / sharded safetensors + index / pytorch_model*.bin.
        out_path: ``X.safetensors`` or ``X.ckpt`` for one file; anything else (an existing folder, a path ending in
            '/', a name without those suffixes) for a folder of shards, one per input shard (a layer's stacked
            experts go to the shard where its last expert arrives): ``model-0000k-of-0000n.safetensors`` +
            ``MS_NAME_MAP`` (MindFormers' ``param_name_map.json``), or with ``fmt='ckpt'``
            ``deepseek2-0000k-of-0000n.ckpt`` + ``MS_INDEX_NAME``.
        dtype: 'bf16' | 'fp16' | 'fp32' or None (keep each tensor's source dtype).
        config: a DeepseekV2Config; default ``hf_dir/config.json``.
        fmt: 'safetensors' (default) or 'ckpt' for a folder; a file's format is its suffix.
    Returns: {"files": [...], "params": count, "bytes": total tensor bytes, "format": fmt}.
    """
    if config is None:
        config = load_model_config(os.path.join(hf_dir, "config.json"))
    folder, fmt = _output_layout(out_path, fmt)
    hf = HFCheckpoint(hf_dir)
    expected = expected_ms_shapes(config)
    groups = _plan_ms_shards(hf, config, dtype)
    logger.info(f"converting {hf_dir} ({len(hf.files)} {hf.format} file(s)) -> {out_path} ({fmt}"
                f"{' shards' if folder else ''}), dtype {dtype or 'as in the source'}")
    if folder:
        if fmt == "safetensors":
            names = [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))]
            index_name = MS_NAME_MAP
        else:
            names = [f"deepseek2-{k + 1:05d}-of-{len(groups):05d}.ckpt" for k in range(len(groups))]
            index_name = MS_INDEX_NAME
        _check_output_folder(out_path, set(names) | {index_name})
        stage = StagedDir(out_path)
        paths = [stage.file(n) for n in names]
    else:
        groups = [[entry for group in groups for entry in group]]
        stage = StagedFile(out_path)
        paths = [stage.tmp]
    shard_of = {name: k for k, group in enumerate(groups) for name, _, _ in group}
    left = [len(group) for group in groups]
    written, total, writers = {}, 0, {}
    try:
        for _, name, array in hf.iter_parameters(config, dtype, progress):
            k = shard_of[name]
            if name in written:
                raise CheckpointError(f"{hf_dir}: parameter {name!r} produced twice")
            if k not in writers:  # opened at its first tensor, closed (and checked) at its last
                writers[k] = _writer(paths[k], fmt, groups[k])
            writers[k].write(name, array)
            written[name] = array.shape
            total += array.nbytes
            del array  # before the generator builds the next one
            left[k] -= 1
            if left[k] == 0:
                writers.pop(k).close()
        _check_complete(written, expected, out_path)
        if folder:
            weight_map = {name: names[shard_of[name]] for name in expected}
            with open(stage.file(index_name), "w") as f:
                if fmt == "safetensors":
                    json.dump(weight_map, f, indent=2)
                else:
                    json.dump({"metadata": {"total_size": total, "format": "ckpt"}, "weight_map": weight_map}, f,
                              indent=2)
        stage.commit()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        stage.abort()
        raise
    if not folder:
        logger.info(f"wrote {stage.path}: {len(written)} parameters, {total / 2**20:.1f} MiB")
        return {"files": [stage.path], "params": len(written), "bytes": total, "format": fmt}
    files = [os.path.join(stage.path, n) for n in names]
    logger.info(f"wrote {len(files)} {fmt} shard(s) + {index_name} to {stage.path}: {len(written)} parameters, "
                f"{total / 2**20:.1f} MiB")
    return {"files": files, "params": len(written), "bytes": total, "format": fmt}


# ---------------------------------------------------------------------------------------------------- MS -> HF
def convert_ms_to_hf(ms_path: str, hf_dir: str, config, dtype=None, max_shard_size="5GB",
                     progress: bool = True, adapters_only: bool = False) -> dict:
    """Convert a MindSpore checkpoint to Hugging Face safetensors shards.

    ``ms_path``: a ``.safetensors`` or ``.ckpt`` file, a folder of either (``MindSporeCheckpoint``), or its index json.

    Writes ``model-0000k-of-0000n.safetensors``, ``model.safetensors.index.json`` and ``config.json`` (from
    ``config.to_hf_dict()``) into ``hf_dir``, loadable by transformers' ``DeepseekV2ForCausalLM.from_pretrained``.
    ``config``: a DeepseekV2Config or a path for ``load_model_config``. ``dtype`` None keeps the stored dtypes.
    A config with a ``pet_config`` (a LoRA YAML) reads a LoRA checkpoint: every targeted weight is written merged,
    W + lora_alpha / lora_rank * B A (``lora/checkpoints.py``); ``adapters_only`` writes the adapters alone in the PEFT layout.
    Returns {"files": [...], "params": HF tensor count, "bytes": total}.
    """
    if not isinstance(config, DeepseekV2Config):
        config = load_model_config(config)
    limit = parse_size(max_shard_size)
    source = MindSporeCheckpoint(ms_path)
    info = source.tensors
    expected = expected_ms_shapes(config)
    pet_config = getattr(config, "pet_config", None)
    adapters, targets = {}, {}
    if pet_config:                                      # checks base weights and adapters from the headers
        from research.deepseek2.lora.checkpoints import adapter_targets, merge_one, read_adapters, write_peft
        adapters, targets = read_adapters(source, config, pet_config), adapter_targets(config, pet_config)
        if adapters_only:
            shapes = write_peft(hf_dir, adapters, config, pet_config)
            return {"files": ["adapter_model.safetensors", "adapter_config.json"], "params": len(shapes)}
    elif adapters_only:
        raise CheckpointError("--adapters_only needs the LoRA YAML (model.model_config.pet_config) as --config")
    else:
        # the one completeness rule of the loaders: a training output's optimizer/step state and a declared
        # non-weight (the latent cache) are skipped, logged; anything else missing, unexpected or mis-shaped is
        # refused (a LoRA checkpoint's adapters too: give the LoRA YAML to merge them)
        raise_problems(compare(expected, source.parameters(), ms_path, declared_buffers(config)), ms_path)
    out_dtypes = {n: (np_dtype(dtype) if dtype else info[n].dtype) for n in expected}
    plan = plan_shards(((hf_name, out_dtypes[hf_to_ms(hf_name)[0]], shape)
                        for hf_name, shape in expected_hf_shapes(config).items()), limit)
    if os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
        logger.warning(f"{hf_dir}/model.safetensors exists and would be preferred over the new {HF_INDEX_NAME} by "
                       f"transformers: remove it")
    logger.info(f"converting {ms_path} -> {hf_dir}: {len(plan)} safetensors shard(s) of at most {limit} bytes")
    stage = StagedDir(hf_dir)
    out = None
    try:
        out = ShardedSafetensorsWriter(stage.file, "model", plan, {"format": "pt"})     # HF_INDEX_NAME's stem
        for _, name, array in source.iter_parameters(progress=progress):
            if name not in expected:                      # training state, adapters or the latent cache (checked)
                continue
            if name in targets:                           # W + lora_alpha / lora_rank * B A
                array = merge_one(name, array, adapters, targets, pet_config)
            if is_stacked(name):                          # cast row by row: no second copy of the whole stack
                for e in range(array.shape[0]):
                    hf_name = ms_to_hf(name, e)
                    out.write(hf_name, cast_array(array[e], out_dtypes[name]))
            else:
                hf_name = ms_to_hf(name)
                out.write(hf_name, cast_array(array, out_dtypes[name]))
            del array
        out.close()
        hf_config = config.to_hf_dict()
        kinds = [dtype_name(d) for d in out_dtypes.values()]
        hf_config["torch_dtype"] = max(set(kinds), key=kinds.count)
        with open(stage.file("config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        stage.commit()
    except BaseException:
        if out is not None:
            out.abort()
        stage.abort()
        raise
    logger.info(f"wrote {len(out.names)} shard(s), {HF_INDEX_NAME} and config.json to {stage.path} "
                f"({out.nbytes / 2**20:.1f} MiB)")
    return {"files": [os.path.join(stage.path, n) for n in out.names], "params": len(out.weight_map),
            "bytes": out.nbytes}


# ---------------------------------------------------------------------------------------------------- docs
def name_map_markdown() -> str:
    """The weight_map.NAME_MAP table as Markdown (docs/weights.md embeds it)."""
    lines = ["| Hugging Face tensor | MindSpore parameter | shape (MindSpore) |", "|---|---|---|"]
    for hf, ms_name in NAME_MAP:
        stacked = is_stacked(ms_name)
        shape = "(n_routed_experts, out, in): row {E} = HF expert {E}" if stacked else "same as HF"
        lines.append(f"| `{hf}` | `{ms_name}` | {shape} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert DeepSeek-V2 weights: Hugging Face -> MindSpore (safetensors or .ckpt) or back "
                    "(--reverse).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Errors (missing/unknown/mis-shaped tensors, truncated files) name the tensor and file, leave no "
               "output behind and exit with status 1.")
    parser.add_argument("--torch_ckpt_path", required=True,
                        help="Hugging Face folder: input (config.json + model.safetensors, sharded safetensors with "
                             f"{HF_INDEX_NAME}, or pytorch_model*.bin), or the output folder with --reverse")
    parser.add_argument("--mindspore_ckpt_path", required=True,
                        help="MindSpore checkpoint: output (X.safetensors or X.ckpt for one file; any other path is a "
                             "folder of one shard per input shard: model-*.safetensors + "
                             f"{MS_NAME_MAP}, or with --format ckpt .ckpt shards + {MS_INDEX_NAME}), or the input "
                             "with --reverse (a file, a folder of either format, or its index json)")
    parser.add_argument("--format", default=None, choices=OUTPUT_FORMATS, dest="fmt",
                        help="shard format of a folder output (default safetensors); a file's is its suffix")
    parser.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                        help="output dtype; default: keep each tensor's source dtype (released HF weights are bf16)")
    parser.add_argument("--reverse", action="store_true", help="MindSpore -> Hugging Face safetensors")
    parser.add_argument("--config", default=None,
                        help="config.json, HF folder or MindFormers model YAML (model.model_config); required with "
                             "--reverse, optional otherwise (default: TORCH_CKPT_PATH/config.json)")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="largest safetensors shard with --reverse (5GB = 5e9 bytes; GiB units too)")
    parser.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    parser.add_argument("--quantize", default=None, metavar="{int8,int4}",
                        help="write a weight-only quantized folder (msModelSlim's W8A16 / W4A16 layout) instead: from "
                             "TORCH_CKPT_PATH to MINDSPORE_CKPT_PATH, or with --reverse from MINDSPORE_CKPT_PATH "
                             "(+ --config) to TORCH_CKPT_PATH")
    parser.add_argument("--group_size", type=int, default=None,
                        help="with --quantize: inputs sharing a scale (default: 0 = per output channel for int8, 128 "
                             "for int4)")
    parser.add_argument("--modules_to_not_convert", default=None,
                        help="with --quantize: comma-separated (parts of) weight names kept in float, e.g. "
                             "shared_experts,model.layers.0.mlp")
    parser.add_argument("--adapters_only", action="store_true",
                        help="with --reverse and a LoRA YAML as --config: write only the adapters, in the PEFT layout "
                             "(adapter_model.safetensors + adapter_config.json)")
    return parser


def _quantize(args) -> int:
    """convert_weight.py --quantize: 2 for bad settings (named), 1 for a checkpoint that cannot be read."""
    from research.deepseek2.errors import QuantizationError
    from research.deepseek2.quantization.convert import quantize_checkpoint
    from research.deepseek2.quantization.settings import parse_quantization_config
    try:
        fields = {"weight_dtype": args.quantize}
        if args.group_size is not None:
            fields["group_size"] = args.group_size
        if args.modules_to_not_convert:
            fields["modules_to_not_convert"] = [m for m in args.modules_to_not_convert.split(",") if m]
        settings = parse_quantization_config(fields, where="--quantize")
        if args.fmt or args.adapters_only:
            raise QuantizationError("--quantize writes msModelSlim's safetensors folder: drop --format / "
                                    "--adapters_only")
        source, out = (args.mindspore_ckpt_path, args.torch_ckpt_path) if args.reverse else \
            (args.torch_ckpt_path, args.mindspore_ckpt_path)
        config = load_model_config(args.config) if args.config else None
        quantize_checkpoint(source, out, settings, config, args.dtype, parse_size(args.max_shard_size),
                            progress=not args.no_progress)
    except QuantizationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, ValueError, OSError) as err:
        logger.error(f"conversion failed: {err}")
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quantize is not None:
        return _quantize(args)
    if args.group_size is not None or args.modules_to_not_convert:
        print("error: --group_size and --modules_to_not_convert go with --quantize", file=sys.stderr)
        return 2
    try:
        if args.reverse:
            if not args.config:
                raise CheckpointError("--reverse needs --config (config.json, HF folder or model YAML)")
            if args.fmt:
                raise CheckpointError("--format names the MindSpore output's format; with --reverse the input's "
                                      "format is read from the files")
            convert_ms_to_hf(args.mindspore_ckpt_path, args.torch_ckpt_path, args.config, args.dtype,
                             args.max_shard_size, progress=not args.no_progress, adapters_only=args.adapters_only)
        else:
            if args.adapters_only:
                raise CheckpointError("--adapters_only goes with --reverse")
            config = load_model_config(args.config) if args.config else None
            convert_hf_to_ms(args.torch_ckpt_path, args.mindspore_ckpt_path, args.dtype, config,
                             progress=not args.no_progress, fmt=args.fmt)
    except (CheckpointError, ValueError, OSError) as err:
        logger.error(f"conversion failed: {err}")
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
