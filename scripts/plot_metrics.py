"""Plot a run's metrics.jsonl into <run_dir>/report.png: reward, pass@1 / pass@k, sequence length.

    python scripts/plot_metrics.py RUN_DIR

train_rl.py draws the same report at the end of every run (jaxrl.report.plot_run, which says how
the warm start's rows and the RL steps share the x axis).
"""
import argparse

from jaxrl.report import plot_run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir))
    except (ValueError, OSError) as e:  # no metrics.jsonl, or no rows in it
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
