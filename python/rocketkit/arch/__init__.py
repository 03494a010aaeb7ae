"""Model adapters for what the generic walk (rocketkit.models) cannot infer by itself, one file per kind."""
