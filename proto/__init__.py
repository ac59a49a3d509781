"""Wire schema of the stage and coordinator services."""
