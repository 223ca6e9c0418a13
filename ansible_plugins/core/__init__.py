"""The logic behind Marco's Ansible plugins (importable, unlike the plugin files)."""
