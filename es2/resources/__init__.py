"""Original sample data shipped with es2: benign prose for perplexity and an MMLU-format question sample."""
