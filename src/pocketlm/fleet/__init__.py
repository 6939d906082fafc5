"""Fleet deployment: signed, differential model packages, install with rollback, shadow/canary, acceptance gates, cost."""
