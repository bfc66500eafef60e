"""This model for lm-evaluation-harness: the ``deepseek2-mindspore`` model of ``lm_eval``.

lm-eval 0.4.13 finds models only inside its own package (no entry points), so importing this module registers the
class, and ``deepseek2-lm-eval`` (``main`` below) imports it before handing lm-eval's own command line its flags
unchanged:

    deepseek2-lm-eval --model deepseek2-mindspore \\
        --model_args config=configs/deepseek2/predict_deepseek2_tiny.yaml,load_checkpoint=HF_DIR[,tokenizer_file=...] \\
        --tasks TASKS [--include_path DIR] [--batch_size 4] ...

From Python: ``lm_eval.simple_evaluate(model=DeepseekV2LM(config=..., load_checkpoint=...), tasks=[...])``.

The class follows lm-eval's ``hf`` model wherever the numbers depend on it, so both give the same log-likelihoods on
the same weights: ``TemplateLM``'s tokenization of (context, continuation) pairs, no BOS added (the ``hf`` model's
default), the sentence-start token as the context of an empty one, left truncation to the model's length, inputs padded
on the right (a causal model never looks ahead, so padding changes no earlier position), log-softmax in float32.
Scoring runs the model without its cache, batches padded to a power-of-two length (one compiled graph per length in
graph mode); ``generate_until`` runs ``generate`` over the latent cache. The code tasks' programs (``humaneval``,
``mbpp``: ``--confirm_run_unsafe_code``) run in our sandbox (``code_eval.py``), not in ``evaluate``'s ``exec``.
"""
import copy
import os
import sys
from typing import List, Optional, Tuple

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval import utils as lm_utils
from tqdm import tqdm

from research.deepseek2.errors import EvaluationError
from research.deepseek2.evaluation import code_eval

__all__ = ["DeepseekV2LM", "main"]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis in float32, as the ``hf`` model computes it."""
    logits = logits.astype(np.float32)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@register_model("deepseek2-mindspore")
class DeepseekV2LM(TemplateLM):
    """A DeepSeek-V2 checkpoint (any kind predict takes) behind lm-eval's LM interface.

    Args (``--model_args`` keys): config (the predict YAML that builds the model), load_checkpoint (a Hugging Face
    folder, a MindSpore .ckpt or safetensors file or folder), tokenizer_file (default: the checkpoint folder's
    tokenizer.json), batch_size, max_length (default: the YAML's seq_length), mode (0 graph, 1 PyNative; default:
    the YAML's).
    """

    def __init__(self, config: str, load_checkpoint: str, tokenizer_file: Optional[str] = None, batch_size=1,
                 max_length: Optional[int] = None, mode: Optional[int] = None, **kwargs):
        super().__init__()
        unknown = sorted(k for k in kwargs if k not in ("device", "max_batch_size", "dtype", "trust_remote_code"))
        if unknown:
            raise EvaluationError(f"--model_args {unknown[0]}: not a key of deepseek2-mindspore (config, "
                                  f"load_checkpoint, tokenizer_file, batch_size, max_length, mode)")
        if kwargs.get("device") not in (None, "cpu", "CPU"):      # lm-eval's CLI passes cuda:0 unless told
            from mindformers.tools.logger import logger
            logger.warning(f"deepseek2-mindspore: --device {kwargs['device']} is not used; MindSpore runs on the "
                           f"YAML's context.device_target")
        code_eval.install()                 # lm-eval's code tasks (humaneval, mbpp) run their programs in our sandbox
        self.config_file, self.checkpoint_path = config, load_checkpoint
        tokenizer_file = tokenizer_file or os.path.join(load_checkpoint, "tokenizer.json")
        for flag, path in (("config", config), ("tokenizer_file", tokenizer_file)):
            if not os.path.isfile(path):
                raise EvaluationError(f"--model_args {flag}={path}: no such file")
        if not os.path.exists(load_checkpoint):
            raise EvaluationError(f"--model_args load_checkpoint={load_checkpoint}: no such file or folder")
        from research.deepseek2.deepseek2_tokenizer import DeepseekV2Tokenizer
        self.tokenizer = DeepseekV2Tokenizer(tokenizer_file=tokenizer_file)
        self._batch_size = int(batch_size) if str(batch_size) != "auto" else 1
        self._yaml, self._checkpoint = self._load(mode)
        self._max_length = int(max_length or self._yaml.model.model_config.seq_length)
        self._nets = {}

    # ------------------------------------------------------------------------------------------ the model
    def _load(self, mode):
        from mindformers.tools.register import MindFormerConfig
        from research.deepseek2.errors import UsageError
        from research.deepseek2.run.predict import open_run_checkpoint, setup_context
        yaml = MindFormerConfig(os.path.abspath(self.config_file))
        if mode is not None:
            yaml.context.mode = int(mode)
        try:
            setup_context(yaml)
            return yaml, open_run_checkpoint(self.checkpoint_path, None)
        except UsageError as err:
            raise EvaluationError(str(err)) from err

    def _net(self, use_past: bool):
        """The network for scoring (no cache) or for generation (latent cache), built and loaded once each."""
        if use_past not in self._nets:
            from research.deepseek2.errors import UsageError
            from research.deepseek2.run.predict import build_network, model_config_for
            from research.deepseek2.run.training import pet_config_of
            yaml = copy.deepcopy(self._yaml)
            yaml.model.model_config.use_past = use_past
            yaml.model.model_config.seq_length = self._max_length
            try:
                self._nets[use_past] = build_network(model_config_for(yaml, self._batch_size), self._checkpoint, 1,
                                                     0, pet_config_of(yaml))
            except UsageError as err:
                raise EvaluationError(str(err)) from err
        return self._nets[use_past]

    # ------------------------------------------------------------------------------------------ lm-eval's API
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and the first rolling window are scored after: the sentence start DeepSeek's
        prompts begin with (the ``hf`` model's choice too), the end of text only for a tokenizer without one."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> List[int]:
        ids = list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def _logits(self, rows: List[List[int]]) -> np.ndarray:
        """(len(rows), padded length, vocab) float32 logits of rows right-padded to a power-of-two length."""
        import mindspore as ms
        longest = max(len(row) for row in rows)
        width = min(self._max_length, 1 << max(4, (longest - 1).bit_length()))
        pad = self.eot_token_id
        batch = [row + [pad] * (width - len(row)) for row in rows]
        batch += [batch[-1]] * (self._batch_size - len(batch))        # one batch shape: one graph a length
        return self._net(False)(ms.Tensor(np.asarray(batch, np.int32))).asnumpy()[:len(rows)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives the continuation) per
        request, as the ``hf`` model computes them."""
        results = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        for start in tqdm(range(0, len(order), self._batch_size), disable=disable_tqdm, desc="loglikelihood"):
            chunk = order[start:start + self._batch_size]
            rows, spans = [], []
            for index in chunk:
                _, context, continuation = requests[index]
                whole = (context + continuation)[-(self._max_length + 1):]
                rows.append(whole[:-1])                                   # the last token is only predicted
                spans.append((len(whole) - 1 - len(continuation), continuation))
            log_probs = _log_softmax(self._logits(rows))
            for index, row, (first, continuation) in zip(chunk, log_probs, spans):
                picked = row[first:first + len(continuation)]              # (continuation, vocab)
                score = float(picked[np.arange(len(continuation)), continuation].sum())
                greedy = bool((picked.argmax(-1) == np.asarray(continuation)).all())
                results[index] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[index][0], (score, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Whole-document log-likelihoods in windows of the model's length, as the ``hf`` model cuts them."""
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for window in map(lm_utils.make_disjoint_window,
                              lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                                 prefix_token=self.prefix_token_id,
                                                                 max_seq_len=self._max_length, context_len=1)):
                windows.append((None,) + window)
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Greedy (or sampled, if the task asks) continuations over the latent cache, cut at the task's stop
        strings."""
        outputs = [None] * len(requests)
        groups = {}
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id], skip_special_tokens=False)]
            until = [until] if isinstance(until, str) else list(until)
            new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            key = (new, sample and temperature > 0, temperature, tuple(until))
            groups.setdefault(key, []).append((index, context))
        net = self._net(True)
        pad = net.config.pad_token_id
        for (new, sample, temperature, until), items in groups.items():
            for start in tqdm(range(0, len(items), self._batch_size), disable=disable_tqdm, desc="generate_until"):
                chunk = items[start:start + self._batch_size]
                prompts = [self.tok_encode(context, left_truncate_len=self._max_length - new)
                           for _, context in chunk]
                width = max(len(p) for p in prompts)
                rows = [p + [pad] * (width - len(p)) for p in prompts]
                rows += [rows[-1]] * (self._batch_size - len(rows))
                kwargs = dict(max_new_tokens=new, do_sample=sample)
                if sample:
                    kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
                out = net.generate(rows, **kwargs)
                for (index, context), prompt, ids in zip(chunk, prompts, out):
                    text = self.tok_decode([int(t) for t in ids[len(prompt):]])
                    for stop in until:
                        if stop and stop in text:
                            text = text[:text.index(stop)]
                    outputs[index] = text
                    self.cache_hook.add_partial("generate_until", (context, {"until": list(until)}), text)
        return outputs


def main(argv=None):
    """deepseek2-lm-eval: lm-eval's command line with the deepseek2-mindspore model registered (flags unchanged)."""
    from lm_eval.__main__ import cli_evaluate
    code_eval.install()
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    return cli_evaluate()


if __name__ == "__main__":
    main()
