"""What ``run_mindformer.py`` does: parse MindFormers' flags, apply them to the YAML, run the job.

train / finetune go through MindFormers' Trainer (CausalLanguageModelingTrainer, ``training.py``); predict builds
the same tokenizer and network from the YAML and calls ``generate`` (``predict.py``).
Bad input (unknown flag, missing file, a YAML key given a value of the wrong type) ends with one line naming it
and exit code 2.
"""
import argparse
import os
import sys
from typing import List, NamedTuple, Optional

import yaml

from research.deepseek2.errors import NonFiniteLossError, UsageError

RUN_MODES = ("train", "finetune", "predict")

# MindFormers is imported inside the functions below, not here: importing this module stays as light as the package.


def _bool(text):
    """argparse type for True / False (any case), as MindFormers' run_mindformer.py parses its flags."""
    from mindformers.tools.utils import str2bool
    try:
        return str2bool(text)
    # str2bool raises a bare Exception, which argparse does not catch (a traceback); ArgumentTypeError is a usage line
    except Exception as err:  # pylint: disable=broad-except
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_mindformer.py", allow_abbrev=False,
        description="Run DeepSeek-V2 train / finetune / predict from a MindFormers YAML. "
                    "Any YAML key can be set with --a.b.c VALUE.")
    add = parser.add_argument
    add("--config", required=True, help="the YAML file")
    add("--run_mode", choices=RUN_MODES, help="overrides the YAML's run_mode")
    add("--use_parallel", type=_bool, help="True to run distributed (under msrun_launcher.sh)")
    add("--load_checkpoint", help="a checkpoint file or folder (finetune / predict / resume)")
    add("--load_ckpt_format", choices=("safetensors", "ckpt"),
        help="format of --load_checkpoint (MindFormers' key): safetensors (a Hugging Face folder, or MindSpore "
             "safetensors) or ckpt; unset: what the path holds")
    add("--train_data", "--train_dataset_dir", dest="train_data", help="a MindRecord file or a folder of them")
    add("--predict_data", nargs="+", help="one or more prompts, or a file (one prompt a line, or a JSON list)")
    add("--predict_length", type=int, help="number of new tokens to generate")
    add("--predict_batch_size", type=int, help="prompts generated together")
    add("--output_dir", help="where logs, checkpoints and results go")
    add("--tokenizer_file", help="tokenizer.json (overrides processor.tokenizer.tokenizer_file)")
    add("--register_path", help="accepted for compatibility: this project registers itself when imported")
    add("--seed", type=int, help="random seed")
    add("--resume_training", type=_bool, nargs="?", const=True, help="resume from the latest checkpoint")
    add("--epochs", type=int, help="training epochs")
    add("--batch_size", type=int, help="per-device batch size")
    add("--mode", type=int, choices=(0, 1), help="0 GRAPH_MODE, 1 PYNATIVE_MODE")
    add("--device_target", choices=("CPU", "GPU", "Ascend"), help="overrides context.device_target")
    add("--device_id", type=int, help="overrides context.device_id")
    add("--auto_trans_ckpt", type=_bool, help="MindFormers' automatic checkpoint transformation")
    add("--src_strategy_path_or_dir", help="strategy of a distributed checkpoint being loaded")
    add("--do_sample", type=_bool, help="predict: sample instead of greedy decoding")
    add("--top_k", type=int, help="predict: sample among the k most likely tokens")
    add("--top_p", type=float, help="predict: nucleus sampling threshold")
    add("--temperature", type=float, help="predict: sampling temperature")
    add("--repetition_penalty", type=float, help="predict: penalty for repeated tokens (1.0 = off)")
    add("--chat", type=_bool, nargs="?", const=True, help="predict: wrap prompts in the DeepSeek-V2-Chat template")
    add("--stream", type=_bool, nargs="?", const=True, help="predict: print tokens as they come")
    return parser


class Override(NamedTuple):
    """One ``--a.b.c value`` from the command line: the key path, the parsed value and the text as given."""
    path: List[str]
    value: object
    text: str


def parse_override_value(text: str):
    """An override's value: MindFormers' ``parse_value`` (int, float, True/False, JSON), then YAML for the rest.

    YAML covers what the README promises beyond JSON (flow lists and maps such as ``[{type: MFLossMonitor}]``,
    ``true``/``null``/``~``); text that is neither stays a string.
    """
    from mindformers.tools.utils import parse_value
    try:
        value = parse_value(text)
    # it takes a text float() reads as a whole number for an int and then calls int(text), which fails on "1.0" /
    # "1e3" (ValueError) and "inf" (OverflowError): those texts are floats
    except (ValueError, OverflowError):
        value = float(text)
    if isinstance(value, str) and value:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            pass
    return value


def parse_overrides(rest: List[str]) -> List[Override]:
    """``--a.b.c value`` / ``--a.b.c=value`` pairs (what argparse left over) -> [Override(["a","b","c"], ...)].

    The pairing is ours (upstream run_mindformer.py splits every argument at each "=", which breaks values holding
    one, and reports an odd count without naming the flag); the values are read by ``parse_override_value``.
    """
    out, i = [], 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or len(token) == 2:
            raise UsageError(f"unexpected argument {token!r} (flags look like --name value)")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest) or (rest[i + 1].startswith("--") and len(rest[i + 1]) > 2):
                raise UsageError(f"--{key} needs a value")
            value = rest[i + 1]
            i += 1
        out.append(Override(key.split("."), parse_override_value(value), value))
        i += 1
    return out


def _type_ok(old, new) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)):
        return isinstance(new, (int, float)) and not (isinstance(old, int) and isinstance(new, float)
                                                       and not new.is_integer())
    if isinstance(old, str):
        return isinstance(new, (str, int, float))
    if isinstance(old, (list, tuple)):
        return isinstance(new, (list, tuple))
    if isinstance(old, dict):
        return isinstance(new, dict)
    return True


def set_key(config, path: List[str], value, origin: str, text: Optional[str] = None):
    """Set config[a][b][c] = value; the key's existing value fixes its type.

    The check and the type coercion are ours; the merge is MindFormers' ``MindFormerConfig.merge_from_dict`` (it
    creates missing levels, merges a mapping value into an existing mapping and turns mappings into
    MindFormerConfig). ``text``: the value as typed on the command line, kept as is for a key whose YAML value
    is a string (so ``1.10`` stays "1.10").
    """
    node = config
    for part in path[:-1]:
        node = node.get(part)
        if node is None:
            break
        if not isinstance(node, dict):
            raise UsageError(f"{origin}: {'.'.join(path)}: {part} is not a mapping in the YAML")
    old = node.get(path[-1]) if isinstance(node, dict) else None
    if not _type_ok(old, value):
        raise UsageError(f"{origin}: {'.'.join(path)} expects {type(old).__name__} (YAML has {old!r}), "
                         f"got {value!r}")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, int) and not isinstance(old, bool) and isinstance(value, float):
        value = int(value)
    if isinstance(old, str) and not isinstance(value, str):
        value = text if text is not None else str(value)
    config.merge_from_dict({".".join(path): value})


def _need_file(path: str, flag: str, folder_ok: bool = False):
    if not path:
        return
    if not os.path.exists(path) or (os.path.isdir(path) and not folder_ok):
        kind = "file or folder" if folder_ok else "file"
        raise UsageError(f"{flag}: no such {kind}: {path}")


def load_run_config(args, overrides: List[Override]):
    """The YAML as a MindFormerConfig with the flags and the ``--a.b.c value`` overrides applied."""
    _need_file(args.config, "--config")
    from mindformers.tools.register import MindFormerConfig
    try:
        config = MindFormerConfig(os.path.abspath(args.config))
    except yaml.YAMLError as err:
        raise UsageError(f"--config {args.config}: not valid YAML ({str(err).splitlines()[0]})") from err
    with open(args.config, encoding="utf-8") as handle:
        written = yaml.safe_load(handle) or {}
    if "load_ckpt_format" not in written:
        # MindFormers' template fills in "ckpt"; unset in the YAML and on the command line means "what the
        # checkpoint holds" here (training.check_run_checkpoint decides), so a Hugging Face folder needs no flag
        config.load_ckpt_format = ""
    for path, value, text in overrides:
        if len(path) == 1 and path[0] not in config:
            raise UsageError(f"unknown flag --{path[0]} (see --help; YAML keys are set as --a.b.c value)")
        set_key(config, path, value, "override", text)
    flag_keys = {
        "run_mode": ["run_mode"], "use_parallel": ["use_parallel"], "load_checkpoint": ["load_checkpoint"],
        "load_ckpt_format": ["load_ckpt_format"],
        "output_dir": ["output_dir"], "seed": ["seed"], "resume_training": ["resume_training"],
        "auto_trans_ckpt": ["auto_trans_ckpt"], "src_strategy_path_or_dir": ["src_strategy_path_or_dir"],
        "epochs": ["runner_config", "epochs"], "mode": ["context", "mode"],
        "device_target": ["context", "device_target"], "device_id": ["context", "device_id"],
        "tokenizer_file": ["processor", "tokenizer", "tokenizer_file"],
    }
    for flag, path in flag_keys.items():
        value = getattr(args, flag)
        if value is not None:
            set_key(config, path, value, f"--{flag}")
    if args.batch_size is not None:
        set_key(config, ["runner_config", "batch_size"], args.batch_size, "--batch_size")
        if config.get("train_dataset"):
            set_key(config, ["train_dataset", "batch_size"], args.batch_size, "--batch_size")
    if args.train_data is not None:
        _need_file(args.train_data, "--train_data", folder_ok=True)
        for section in ("train_dataset", ):
            set_key(config, [section, "data_loader", "dataset_dir"], os.path.abspath(args.train_data),
                    "--train_data")
        task = config.get("train_dataset_task")
        if task and task.get("dataset_config") is not None:
            task["dataset_config"]["data_loader"]["dataset_dir"] = os.path.abspath(args.train_data)
    if not config.get("run_mode"):
        raise UsageError(f"--config {args.config}: run_mode is not set (give --run_mode)")
    if config.run_mode not in RUN_MODES:
        raise UsageError(f"run_mode {config.run_mode!r}: expected one of {RUN_MODES}")
    _need_file(config.get("load_checkpoint") or "", "--load_checkpoint", folder_ok=True)
    tokenizer_file = ((config.get("processor") or {}).get("tokenizer") or {}).get("tokenizer_file")
    if tokenizer_file:
        _need_file(tokenizer_file, "--tokenizer_file")
    return config



def cli_main(argv: List[str]) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = parse_overrides(rest)
        config = load_run_config(args, overrides)
        if config.run_mode == "finetune" and not config.get("load_checkpoint"):
            raise UsageError("run_mode finetune needs --load_checkpoint (use --run_mode train to start from "
                             "random initialisation)")
        from research.deepseek2 import register
        register()  # the config, model, tokenizer, wrapper and callbacks, by name in MindFormers' registry
        if config.run_mode == "predict":
            from research.deepseek2.run.predict import run_predict
            run_predict(config, args)
        else:
            from research.deepseek2.run.training import run_training
            run_training(config)
    except UsageError as err:
        print(f"run_mindformer.py: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # pylint: disable=broad-except
        if isinstance(err, NonFiniteLossError) or isinstance(err.__cause__, NonFiniteLossError):
            print(f"run_mindformer.py: error: {err}", file=sys.stderr)
            return 3
        raise
    return 0
