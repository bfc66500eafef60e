"""Run DeepSeek-V2 from a MindFormers YAML: ``train``, ``finetune`` (MindFormers' Trainer) or ``predict``.

    python run_mindformer.py --config configs/deepseek2/finetune_deepseek2_tiny.yaml --run_mode train \
        --train_data data.mindrecord --tokenizer_file tokenizer.json [--model.model_config.seq_length 128 ...]

Any YAML key can be overridden with ``--a.b.c value`` (the value is read with MindFormers' ``parse_value``, else as
YAML). A thin shell: the work is done in ``research.deepseek2.run.runner``.
"""
import sys


def main(argv=None):
    from research.deepseek2.run.runner import cli_main
    return cli_main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
