"""``run_mindformer.py --run_mode predict``: prompts in, generated text out (printed and written to a file).

The tokenizer and network come from the YAML (MindFormers' registry); decoding is the model's ``generate``
(MindFormers' GenerationMixin) with the MLA latent cache when ``use_past`` is True.

Prompt ids: with ``chat`` (the default of the predict YAML) a prompt becomes the ids of
``build_chat_prompt(prompt)`` (bos included); without it, ``[bos] + ids(prompt)``. Prompts of one batch are padded
on the right with ``pad_token_id`` (MindFormers finds each row's length from its last non-pad token).

Results: ``{"prompt": ..., "output": ...}`` one JSON object a line, in prompt order, in
``output_dir/text_generation_result.txt``; ``--stream`` prints the tokens as they come (batch size 1).
"""
import json
import os
from typing import List

from mindformers.tools.logger import logger

from research.deepseek2.errors import CheckpointError, UsageError
from research.deepseek2.fileio import atomic_write_text
from research.deepseek2.run.training import pet_config_of

RESULT_FILE = "text_generation_result.txt"
_MODES = {0: 0, 1: 1, "GRAPH_MODE": 0, "PYNATIVE_MODE": 1}


def read_prompts(predict_data) -> List[str]:
    """--predict_data: one or several strings, or one file (JSON list of strings, or one prompt a line)."""
    if not predict_data:
        raise UsageError("--predict_data: no prompt given")
    items = list(predict_data) if isinstance(predict_data, (list, tuple)) else [predict_data]
    if len(items) == 1 and isinstance(items[0], str) and os.path.isfile(items[0]):
        path = items[0]
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError:
            loaded = None
        if isinstance(loaded, list):
            if not all(isinstance(x, str) for x in loaded):
                raise UsageError(f"--predict_data {path}: a JSON file must hold a list of strings")
            items = loaded
        else:
            items = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
        if not items:
            raise UsageError(f"--predict_data {path}: the file holds no prompt")
    for index, prompt in enumerate(items):
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"--predict_data: prompt {index} is empty")
    return [str(x) for x in items]


def encode_prompt(tokenizer, prompt: str, chat: bool) -> List[int]:
    """The ids generation starts from: ids of ``build_chat_prompt(prompt)`` (chat) or ``[bos] + ids(prompt)``."""
    from research.deepseek2.deepseek2_tokenizer import build_chat_prompt
    if chat:
        return list(tokenizer.encode(build_chat_prompt(prompt), add_special_tokens=False))
    return [tokenizer.bos_token_id] + list(tokenizer.encode(prompt, add_special_tokens=False))


def generation_kwargs(args, new_tokens: int) -> dict:
    """``generate`` keywords from the flags, checked here so a bad value is one line, not a MindFormers trace."""
    if new_tokens <= 0:
        raise UsageError(f"--predict_length must be > 0, got {new_tokens}")
    checks = {"top_k": (lambda v: v >= 0, ">= 0 (0 = off)"),
              "top_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
              "temperature": (lambda v: v > 0, "> 0"),
              "repetition_penalty": (lambda v: v > 0, "> 0 (1.0 = off)")}
    kwargs = {"max_new_tokens": new_tokens, "do_sample": bool(args.do_sample)}
    for key, (valid, expected) in checks.items():
        value = getattr(args, key)
        if value is not None:
            if not valid(value):
                raise UsageError(f"--{key} must be {expected}, got {value}")
            kwargs[key] = value
    return kwargs


def setup_context(config):
    """MindFormers' context for predict, safe to call more than once in a process.

    ``build_context`` configures a process only once (its Context is a singleton), so the mode is applied again
    here. MindFormers' sampling post-processing in MindSpore ops needs kernels CPU lacks (TopkExt); on CPU it
    runs in numpy unless ``context.postprocess_use_numpy`` says otherwise.
    """
    import mindspore as ms
    from mindformers.core.context import build_context, set_context
    build_context(config)
    context = config.get("context") or {}
    mode = _MODES.get(context.get("mode", 0))
    if mode is None:
        raise UsageError(f"context.mode {context.get('mode')!r}: expected 0 (GRAPH_MODE) or 1 (PYNATIVE_MODE)")
    ms.set_context(mode=mode)
    use_numpy = context.get("postprocess_use_numpy")
    if use_numpy is None:
        use_numpy = str(context.get("device_target", "CPU")).upper() == "CPU"
    set_context(postprocess_use_numpy=bool(use_numpy))


def _tensor_parallel(config):
    """(ranks, this rank) of the hand-written tensor/expert parallel predict: parallel_config.model_parallel ranks
    under --use_parallel (msrun_launcher.sh); (1, 0) otherwise."""
    if not config.get("use_parallel"):
        return 1, 0
    from mindspore.communication import get_rank, get_group_size
    tp_size = int((config.get("parallel_config") or {}).get("model_parallel", 1))
    world = get_group_size()
    if tp_size != world:
        raise UsageError(f"parallel_config.model_parallel = {tp_size} but {world} ranks were launched: predict "
                         f"splits the model over all ranks (set model_parallel to the number of workers)")
    return tp_size, get_rank()


def model_config_for(config, batch_size):
    """DeepseekV2Config from the YAML's model.model_config, for ``batch_size`` prompts at a time."""
    from research.deepseek2.deepseek2_config import DeepseekV2Config
    fields = {k: v for k, v in dict(config.model.model_config).items() if k != "type"}
    fields["batch_size"] = batch_size
    try:
        return DeepseekV2Config(**fields)
    except (ValueError, TypeError) as err:
        raise UsageError(f"model.model_config: {err}") from err


def _build_tokenizer(tokenizer_cfg):
    from mindformers.models.build_tokenizer import build_tokenizer
    try:
        return build_tokenizer(tokenizer_cfg)
    except (ValueError, OSError) as err:
        raise UsageError(f"--tokenizer_file {tokenizer_cfg.get('tokenizer_file')}: {err}") from err


def _settings(config, args):
    """(prompts, new tokens, generate keywords, tokenizer section, batch size, chat) from the flags and YAML."""
    prompts = read_prompts(args.predict_data if args.predict_data is not None else config.get("input_data"))
    model_config = config.model.model_config
    new_tokens = args.predict_length if args.predict_length is not None else \
        int(model_config.get("max_new_tokens") or 128)
    gen_kwargs = generation_kwargs(args, new_tokens)
    tokenizer_cfg = (config.get("processor") or {}).get("tokenizer")
    if not tokenizer_cfg or not tokenizer_cfg.get("tokenizer_file"):
        raise UsageError("predict needs a tokenizer: set processor.tokenizer.tokenizer_file or --tokenizer_file")
    batch_size = args.predict_batch_size if args.predict_batch_size is not None else \
        int(model_config.get("batch_size") or 1)
    if batch_size <= 0:
        raise UsageError(f"--predict_batch_size must be > 0, got {batch_size}")
    chat = bool(args.chat if args.chat is not None else model_config.get("chat", False))
    return prompts, new_tokens, gen_kwargs, tokenizer_cfg, batch_size, chat


def encode_prompts(tokenizer, prompts, chat: bool, model_config, new_tokens: int) -> List[List[int]]:
    """Token ids of every prompt, checked against the model's seq_length and vocabulary."""
    prompt_ids = []
    for index, prompt in enumerate(prompts):
        ids = encode_prompt(tokenizer, prompt, chat)
        if len(ids) + 1 > model_config.seq_length:
            raise UsageError(f"--predict_data: prompt {index} is {len(ids)} tokens; seq_length is "
                             f"{model_config.seq_length} (raise --model.model_config.seq_length)")
        if max(ids) >= model_config.vocab_size:
            raise UsageError(f"--predict_data: prompt {index} has token id {max(ids)} but the model's vocab_size "
                             f"is {model_config.vocab_size} (tokenizer and model do not match)")
        if len(ids) + new_tokens > model_config.seq_length:
            logger.warning(f"prompt {index}: {len(ids)} prompt tokens + {new_tokens} new tokens exceed seq_length "
                           f"{model_config.seq_length}; generation stops at seq_length")
        prompt_ids.append(ids)
    return prompt_ids


def open_run_checkpoint(path, declared):
    """The checkpoint of a predict run, opened once (None without one), in the format ``load_ckpt_format`` names
    when it names one; UsageError naming both otherwise."""
    from research.deepseek2.checkpoints.check import check_declared_format
    from research.deepseek2.checkpoints import open_checkpoint
    if not path:
        return None
    try:
        checkpoint = open_checkpoint(path)
        check_declared_format(checkpoint, declared)
    except CheckpointError as err:
        raise UsageError(f"--load_checkpoint {path}: {err}") from err
    return checkpoint


def build_network(model_config, checkpoint, tp_size: int, tp_rank: int, pet_config=None):
    """The model for this process (all of it, or rank tp_rank's share of tp_size) with the checkpoint (a path or an
    opened checkpoint, or None: random weights) loaded; with a pet_config, a LoRA training output whose adapters
    are merged into the weights (lora.checkpoints.load_merged)."""
    from research.deepseek2.checkpoints.load import build_empty, load_checkpoint
    from research.deepseek2.checkpoints.rank_slices import load_for_rank
    from research.deepseek2.deepseek2 import DeepseekV2ForCausalLM
    from research.deepseek2.planning.inventory import local_shape
    try:
        local = local_shape(model_config, tp_size, tp_rank)
    except ValueError as err:
        raise UsageError(f"model.model_config with parallel_config.model_parallel = {tp_size}: {err}") from err
    net = build_empty(DeepseekV2ForCausalLM, model_config, local) if checkpoint else \
        DeepseekV2ForCausalLM(model_config, local)
    if checkpoint:
        try:
            if pet_config:
                if tp_size > 1:
                    raise UsageError("tensor-parallel predict of a LoRA checkpoint: merge the adapters first "
                                     "(convert_weight.py --reverse ... --config <the LoRA YAML>) and predict from that")
                from research.deepseek2.lora.checkpoints import load_merged
                load_merged(net, checkpoint, pet_config)
            elif tp_size > 1:                                # this rank's heads, FFN columns and experts only
                load_for_rank(net, checkpoint, tp_rank)
            else:                                            # a Hugging Face folder or a MindSpore checkpoint
                load_checkpoint(net, checkpoint)
        except (ValueError, KeyError, RuntimeError) as err:
            raise UsageError(f"--load_checkpoint {getattr(checkpoint, 'path', checkpoint)}: {err}") from err
        net.init_parameters_data()                          # what no checkpoint gives: the latent cache
    else:
        logger.warning("predict without --load_checkpoint: the model has random weights")
    net.set_train(False)
    return net


def _streamer(tokenizer, stream: bool, batch_size: int):
    if not stream:
        return None
    if batch_size != 1:
        logger.warning("--stream prints tokens as they come only with --predict_batch_size 1; printing results "
                       "per batch instead")
        return None
    from mindformers.generation.streamers import TextStreamer
    return TextStreamer(tokenizer, skip_prompt=True)


def generate_texts(net, tokenizer, prompts, prompt_ids, batch_size, gen_kwargs, streamer, seed) -> List[str]:
    """Generate batch by batch (rows right-padded with pad_token_id); returns the decoded new text of each prompt."""
    pad = net.config.pad_token_id
    texts = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        rows = [x + [pad] * (width - len(x)) for x in chunk]                   # (batch, width), right-padded
        while len(rows) < batch_size:                       # the cache is allocated for batch_size rows
            rows.append(rows[-1])
        if streamer is not None:
            print(f"[prompt] {prompts[start]}\n[output] ", end="", flush=True)
        outputs = net.generate(rows, streamer=streamer, seed=seed, **gen_kwargs)
        for offset, (ids, out) in enumerate(zip(chunk, outputs[:len(chunk)])):
            text = tokenizer.decode(list(out[len(ids):]), skip_special_tokens=True)
            texts.append(text)
            if streamer is None:
                print(f"[prompt] {prompts[start + offset]}\n[output] {text}", flush=True)
            print(flush=True)
    return texts


def write_results(output_dir, prompts, texts) -> str:
    """``{"prompt", "output"}`` JSON lines in output_dir/text_generation_result.txt (written whole or not at all)."""
    lines = [json.dumps({"prompt": p, "output": t}, ensure_ascii=False) for p, t in zip(prompts, texts)]
    path = os.path.join(output_dir or "./output", RESULT_FILE)
    atomic_write_text(path, "\n".join(lines) + "\n")
    logger.info(f"predict: {len(texts)} result(s) written to {path}")
    return path


def run_predict(config, args):
    """Generate for every prompt; returns the list of generated texts."""
    import mindspore as ms
    prompts, new_tokens, gen_kwargs, tokenizer_cfg, batch_size, chat = _settings(config, args)
    model_config = model_config_for(config, batch_size)
    setup_context(config)
    if config.get("seed") is not None:
        ms.set_seed(int(config.seed))
    tokenizer = _build_tokenizer(tokenizer_cfg)
    prompt_ids = encode_prompts(tokenizer, prompts, chat, model_config, new_tokens)
    tp_size, tp_rank = _tensor_parallel(config)
    checkpoint = open_run_checkpoint(config.get("load_checkpoint")
                                     or config.model.model_config.get("checkpoint_name_or_path"),
                                     config.get("load_ckpt_format") or None)
    net = build_network(model_config, checkpoint, tp_size, tp_rank, pet_config_of(config))
    streamer = _streamer(tokenizer, bool(args.stream), batch_size)
    texts = generate_texts(net, tokenizer, prompts, prompt_ids, batch_size, gen_kwargs, streamer, config.get("seed"))
    if tp_rank == 0:                                     # every rank holds the same tokens; one writes them
        write_results(config.get("output_dir"), prompts, texts)
    return texts
