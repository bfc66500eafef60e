"""One rank of a tensor/expert-parallel predict (launched by tests/test_tensor_parallel.py through msrun_launcher.sh).

argv: layout (v2|lite), source (hf|ms), checkpoint path, output json path.
"""
import json
import os
import sys

import mindspore as ms
from mindspore.communication import init, get_rank, get_group_size

import reference as R
from research.deepseek2 import DeepseekV2Config, DeepseekV2ForCausalLM
from research.deepseek2.planning.inventory import buffers, local_shape
from research.deepseek2.checkpoints.rank_slices import load_for_rank


def main():
    layout, _source, path, out = sys.argv[1:5]
    mode = int(os.environ.get("TP_TEST_MODE", "0"))
    ms.set_context(mode=mode)
    init()
    rank, size = get_rank(), get_group_size()
    fields = R.V2_STYLE if layout == "v2" else R.LITE_STYLE
    cfg = DeepseekV2Config(**fields, seq_length=32, use_past=True, batch_size=2)
    net = DeepseekV2ForCausalLM(cfg, local_shape(cfg, size, rank))
    load_for_rank(net, path, rank)
    net.set_train(False)
    prompts = json.loads(os.environ["TP_TEST_PROMPTS"])
    rows = net.generate(prompts, max_new_tokens=10, do_sample=False)
    local = {p.name: list(p.shape) for p in net.get_parameters() if p.name not in buffers(cfg)}
    with open(out + f".rank{rank}", "w") as handle:
        json.dump({"tokens": [list(map(int, r)) for r in rows], "shapes": local}, handle)


if __name__ == "__main__":
    main()
