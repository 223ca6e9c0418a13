"""Marco: run Ansible against a LAN of Linux nodes through zero-config agents."""

from setuptools import find_packages, setup

setup(
    name="marco",
    version="0.1.0",
    description="Zero-config agents, a web controller and Ansible plugins for running "
    "playbooks on a LAN with live output in the browser.",
    python_requires=">=3.11",
    packages=find_packages(include=["marco", "marco.*", "agent", "agent.*", "controller",
                                    "controller.*", "ansible_plugins", "ansible_plugins.core"]),
    package_data={"controller": ["templates/*.html", "static/*"]},
    install_requires=[
        "tornado>=6.3",
        "itsdangerous>=2.1",
        "psutil>=5.9",
        "zeroconf>=0.131",
        "python-pam>=2.0",
        "ansible-core>=2.16",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.2", "playwright>=1.40", "hypothesis>=6.100"],
    },
    entry_points={
        "console_scripts": [
            "marco-agent=agent.__main__:main",
            "marco-controller=controller.__main__:main",
            "marco-inventory=marco.inventory_script:main",
            "marco=marco.cli:main",
        ],
    },
)
