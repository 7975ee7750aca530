"""Client-level differential privacy of each site's update (the DP-LoRA baseline): the
mechanism (noise.py, torch) and the accountant (accountant.py, pure math). Import the one you
need; this __init__ imports neither, so the server reports epsilon without torch."""
