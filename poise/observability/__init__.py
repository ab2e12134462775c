"""What operators see of poise: metrics (counted in workers, rendered in the control
plane), access logs, tracing and the history behind the dashboard."""
