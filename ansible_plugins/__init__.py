"""Marco's Ansible plugins. The files under connection/, inventory/, action/ and modules/ are
thin shims that Ansible loads by path under made-up module names; the logic lives in the
importable package `ansible_plugins.core`."""
