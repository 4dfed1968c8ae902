"""``python -m clipood_plugin.posthoc RUN_DIR --beta …`` (the same as ``clipood-posthoc``)."""

from clipood_plugin.posthoc.cli import main

if __name__ == "__main__":
    main()
