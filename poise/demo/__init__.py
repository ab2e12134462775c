"""``poise demo``: built-in demo backends and a balancer in front of them."""
