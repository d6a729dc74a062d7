"""Numbers the paper reports (Belhaouari & Kraidia 2025, GPT-2 124M), for side-by-side tables.

Copied from the paper's Tables 3-6 and 8 as printed; they are the authors' claims on their model and
setup, shown beside smartprune's measurements and always labelled "reported".
"""

from __future__ import annotations

# Table 3: effect of each method (a classification task; accuracy %, loss, F1, recall, precision).
TABLE3 = [
    ("Original model", "0%", 94.67, 0.54, 0.945, 0.947, 0.944),
    ("IRC", "~11%", 96.01, 0.19, 0.958, 0.950, 0.956),
    ("DWC", "~6%", 97.50, 0.08, 0.969, 0.964, 0.960),
    ("FPP-emb", "~22%", 96.43, 1.25, 0.958, 0.959, 0.957),
    ("FPP-FF", "~32%", 96.66, 1.30, 0.965, 0.966, 0.964),
    ("Overall", "~70%", 94.25, 0.60, 0.940, 0.941, 0.939),
]
# Table 4: parameters before / after, C%UB, T%.
TABLE4 = [
    ("IRC", 14_155_776, 18_432, "99.98%", "11.38%"),
    ("DWC", 7_077_888, 9_216, "99.86%", "5.68%"),
    ("FPP-emb", 38_602_560, 11_580_768, "70%", "21.75%"),
    ("FPP-FF", 56_669_184, 17_000_748, "70%", "31.9%"),
    ("Overall", 124_235_010, None, "", "70.69%"),
]
# Table 5: perplexity (WikiText-2, WikiText-103, PTB); None = not reported.
TABLE5 = [
    ("GPT-2", 35.57, 20.2, 37.2),
    ("SparseGPT", 37.5, 22.3, 40.6),
    ("Our approach (70%)", 14.6, 12.7, 14.7),
]
# Table 6: classification accuracy (%) per task.
TABLE6_TASKS = ("cola", "rte", "mrpc", "sst2", "mnli", "qnli", "qqp", "sms")
TABLE6 = [
    ("Base model", 69.0, 75.9, 89.5, 94.8, 85.7, 92.7, 92.5, 94.6),
    ("SparseGPT", 57.7, 62.3, 86.0, 92.2, 74.3, 89.2, 88.5, 92.7),
    ("Our approach (30%)", 65.5, 74.3, 88.8, 92.1, 85.1, 90.7, 92.3, 94.3),
    ("Our approach (70%)", 60.9, 73.9, 88.5, 91.4, 80.8, 89.2, 90.5, 94.2),
]
# Table 8: GPU latency, speed-up, throughput (sequences/s).
TABLE8 = [
    ("GPT-2", "0%", "25 ms", "baseline", "1,280"),
    ("SparseGPT", "60%", "~17 ms", "1.4x", "~1,882"),
    ("Our approach", "70%", "~10 ms", "2.5x", "~3,200"),
]
