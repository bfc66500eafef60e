"""Parity in one command: tiny random DeepSeek-V2 models (V2 layout and Lite layout) made with the PyTorch
reference (transformers' DeepseekV2ForCausalLM, patched for the released YaRN mscale^2 factor), converted to this
model, compared logit by logit and token by token, in graph and PyNative mode.

    python scripts/check_parity.py
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(ROOT, "work_dirs", "logs"))


def main():
    import numpy as np
    import mindspore as ms
    from mindspore import Tensor
    sys.path.insert(0, os.path.join(ROOT, "tests"))        # the PyTorch reference is test code (tests/reference.py)
    import reference as R

    seq, worst = 32, 0.0
    print(f"{'layout':<6} {'mode':<9} {'max |logit diff|':>17} {'logit scale':>12} {'greedy tokens':>14}")
    for name, fields in (("v2", R.V2_STYLE), ("lite", R.LITE_STYLE)):
        ref = R.build_reference(fields)
        ids = np.random.RandomState(7).randint(2, fields["vocab_size"], (2, seq))
        theirs = R.reference_logits(ref, ids)
        prompt = ids[:1, :10]
        expected = list(R.reference_generate(ref, prompt, 12)[0])
        for mode_name, mode in (("graph", ms.GRAPH_MODE), ("pynative", ms.PYNATIVE_MODE)):
            ms.set_context(mode=mode)
            net = R.build_ms(fields, ref, seq_length=seq)
            diff = float(np.abs(net(Tensor(ids, ms.int32)).asnumpy() - theirs).max())
            cached = R.build_ms(fields, ref, seq_length=seq, use_past=True)
            same = list(cached.generate(prompt.tolist(), max_new_tokens=12, do_sample=False)[0]) == expected
            worst = max(worst, diff)
            print(f"{name:<6} {mode_name:<9} {diff:>17.2e} {np.abs(theirs).max():>12.2f} "
                  f"{'equal' if same else 'DIFFERENT':>14}", flush=True)
            if not same:
                sys.exit("parity: generated tokens differ from the reference")
    print(f"parity: max logit difference {worst:.2e} (bound 1e-4)")
    sys.exit(0 if worst <= 1e-4 else 1)


if __name__ == "__main__":
    main()
