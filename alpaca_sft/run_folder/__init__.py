"""A train_sft.py output_dir as a format, below the stages that write it (train/) and read it (release/, eval/):
its file names, checkpoint-N and their seals, the record of what runs wrote there, the lock that keeps one run in
it, and the run's record (train_config.yaml, run_summary.json) read back as typed fields."""
