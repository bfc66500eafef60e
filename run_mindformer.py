"""Run DeepSeek-V2 from a MindFormers YAML: ``train``, ``finetune`` (MindFormers' Trainer) or ``predict``.

    python run_mindformer.py --config configs/deepseek2/finetune_deepseek2_tiny.yaml --run_mode train \
        --train_data data.mindrecord --tokenizer_file tokenizer.json [--model.model_config.seq_length 128 ...]

Any YAML key can be overridden with ``--a.b.c value`` (the value is read with MindFormers' ``parse_value``, else as
YAML). A thin shell: the work is done in ``research.deepseek2.run.runner``.
"""
import os
import sys

# Before MindSpore loads the OpenMP runtime (it reads this once): the project's CPU kernels' OpenMP threads then
# sleep between products instead of spinning, which on a machine with few cores took a core from each of the graph's
# other ops (research/deepseek2/quantization/cpu_kernel.py). A value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv=None):
    from research.deepseek2.run.runner import cli_main
    return cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
