"""The `efx` command (main) and the jobs behind it: run (general model -> verified expert) and
export."""
