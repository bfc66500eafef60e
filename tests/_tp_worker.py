"""One rank of a tensor/expert-parallel predict (launched by tests/test_tensor_parallel.py through msrun_launcher.sh).

argv: layout (v2|lite), source (hf|ms), checkpoint path, output json path.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
from mindspore.communication import init, get_rank, get_group_size  # noqa: E402

import reference as R  # noqa: E402
from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM  # noqa: E402
from research.deepseek2.parallel import load_for_rank  # noqa: E402


def main():
    layout, _source, path, out = sys.argv[1:5]
    mode = int(os.environ.get("TP_TEST_MODE", "0"))
    ms.set_context(mode=mode)
    init()
    rank, size = get_rank(), get_group_size()
    fields = R.V2_STYLE if layout == "v2" else R.LITE_STYLE
    cfg = DeepseekV2Config(**fields, seq_length=32, use_past=True, batch_size=2, tp_size=size, tp_rank=rank)
    net = DeepseekV2ForCausalLM(cfg)
    load_for_rank(net, path, size, rank, fields["n_routed_experts"])
    net.set_train(False)
    prompts = json.loads(os.environ["TP_TEST_PROMPTS"])
    rows = net.generate(prompts, max_new_tokens=10, do_sample=False)
    local = {p.name: list(p.shape) for p in net.get_parameters() if p.requires_grad}
    with open(out + f".rank{rank}", "w") as handle:
        json.dump({"tokens": [list(map(int, r)) for r in rows], "shapes": local}, handle)


if __name__ == "__main__":
    main()
