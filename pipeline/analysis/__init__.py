"""Reading results for people: compare against torch, inspect, plot, truncated SVD."""
