"""Federation: sites that train locally, strategies that combine them, and runners that drive both."""
