"""``run_mindformer.py --run_mode predict``: prompts in, generated text out (printed and written to a file).

The tokenizer and network come from the YAML (MindFormers' registry); decoding is the model's ``generate``
(MindFormers' GenerationMixin) with the MLA latent cache when ``use_past`` is True.
"""
import json
import os
import tempfile
from typing import List

from mindformers.tools.logger import logger

from .runner import UsageError

RESULT_FILE = "text_generation_result.txt"


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
    for index, prompt in enumerate(items):
        if not isinstance(prompt, str) or not prompt.strip():
            raise UsageError(f"--predict_data: prompt {index} is empty")
    return [str(x) for x in items]


def _model_config(config, batch_size):
    from .deepseek2_config import DeepseekV2Config
    fields = {k: v for k, v in dict(config.model.model_config).items() if k != "type"}
    fields["batch_size"] = batch_size
    fields["checkpoint_name_or_path"] = None
    return DeepseekV2Config(**fields)


def _write_atomic(path, text):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run_predict(config, args):
    """Generate for every prompt; returns the list of generated texts."""
    import mindspore as ms
    from mindformers.core.context import build_context
    from mindformers.models.build_tokenizer import build_tokenizer
    from .deepseek2 import DeepseekV2ForCausalLM
    from .deepseek2_tokenizer import build_chat_prompt

    prompts = read_prompts(args.predict_data if args.predict_data is not None else config.get("input_data"))
    new_tokens = args.predict_length if args.predict_length is not None else \
        int(config.model.model_config.get("max_new_tokens") or 128)
    if new_tokens <= 0:
        raise UsageError(f"--predict_length must be > 0, got {new_tokens}")
    tokenizer_cfg = (config.get("processor") or {}).get("tokenizer")
    if not tokenizer_cfg or not tokenizer_cfg.get("tokenizer_file"):
        raise UsageError("predict needs a tokenizer: set processor.tokenizer.tokenizer_file or --tokenizer_file")
    batch_size = args.predict_batch_size or int(config.model.model_config.get("batch_size") or 1)
    chat = bool(args.chat if args.chat is not None else config.model.model_config.get("chat", False))

    build_context(config)
    if config.get("seed") is not None:
        ms.set_seed(int(config.seed))
    tokenizer = build_tokenizer(tokenizer_cfg)
    model_config = _model_config(config, batch_size)
    prompt_ids = []
    for index, prompt in enumerate(prompts):
        if chat:
            ids = tokenizer.encode(build_chat_prompt(prompt), add_special_tokens=False)
        else:
            ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
        if len(ids) + 1 > model_config.seq_length:
            raise UsageError(f"--predict_data: prompt {index} is {len(ids)} tokens; seq_length is "
                             f"{model_config.seq_length} (raise --model.model_config.seq_length)")
        prompt_ids.append(ids)

    net = DeepseekV2ForCausalLM(model_config)
    checkpoint = config.get("load_checkpoint") or config.model.model_config.get("checkpoint_name_or_path")
    if checkpoint:
        from .checkpoint_io import load_ms_checkpoint
        try:
            load_ms_checkpoint(net, checkpoint)
        except (ValueError, KeyError, RuntimeError) as err:
            raise UsageError(f"--load_checkpoint {checkpoint}: {err}") from err
    else:
        logger.warning("predict without --load_checkpoint: the model has random weights")
    net.set_train(False)

    streamer = None
    if args.stream:
        from mindformers.generation.streamers import TextStreamer
        streamer = TextStreamer(tokenizer, skip_prompt=True)
    gen_kwargs = {"max_new_tokens": new_tokens, "do_sample": bool(args.do_sample)}
    for key in ("top_k", "top_p", "temperature", "repetition_penalty"):
        value = getattr(args, key)
        if value is not None:
            gen_kwargs[key] = value
    pad = model_config.pad_token_id
    texts = []
    for start in range(0, len(prompt_ids), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        rows = [x + [pad] * (width - len(x)) for x in chunk]
        while len(rows) < batch_size:                       # the cache is allocated for batch_size rows
            rows.append(rows[-1])
        outputs = net.generate(rows, streamer=streamer if len(chunk) == 1 else None,
                               seed=config.get("seed"), **gen_kwargs)
        for ids, out in zip(chunk, outputs[:len(chunk)]):
            texts.append(tokenizer.decode(list(out[len(ids):]), skip_special_tokens=True))
    lines = []
    for prompt, text in zip(prompts, texts):
        print(f"[prompt] {prompt}\n[output] {text}\n", flush=True)
        lines.append(json.dumps({"prompt": prompt, "output": text}, ensure_ascii=False))
    output_dir = config.get("output_dir") or "./output"
    result_path = os.path.join(output_dir, RESULT_FILE)
    _write_atomic(result_path, "\n".join(lines) + "\n")
    logger.info(f"predict: {len(texts)} result(s) written to {result_path}")
    return texts
