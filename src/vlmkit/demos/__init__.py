"""One-command demos on the built-in synthetic data: `quickstart`, the curation demo, the transfer demo."""
