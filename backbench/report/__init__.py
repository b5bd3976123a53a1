"""Results log, leaderboard aggregation and plots."""
