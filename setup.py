"""Packaging for metadatad."""

from setuptools import find_packages, setup

setup(
    name="metadatad",
    version="0.1.0",
    description="Instance metadata, conductor membership, DHCP boot mappings and TFTP "
    "for bare-metal provisioning controllers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["metadatad", "metadatad.*"]) + ["twisted.plugins"],
    package_data={
        "metadatad.db": ["migrations/*.py", "migrations/versions/*.py"],
        # The console's stylesheet and script: plain files, no build step.
        "metadatad.admin": ["static/*.css", "static/*.js"],
    },
    include_package_data=True,
    install_requires=[
        "twisted[tls]>=24.7.0",
        "klein>=24.8.0",
        "treq>=24.9.1",
        "sqlalchemy>=2.0.30",
        "alembic>=1.13",
        "attrs>=23.2.0",
        "service-identity>=24.1.0",
        "prometheus_client>=0.20",
        "markupsafe>=2.1",
    ],
    extras_require={
        "postgresql": ["psycopg[binary]>=3.1.18"],
        "mysql": ["pymysql>=1.1"],
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "hypothesis>=6.100",
            "psycopg[binary]>=3.1.18",
            "pymysql>=1.1",
            "botocore>=1.34",
            "tftpy>=0.8.7",
            "import-linter>=2.1",
            "grimp>=3.4",
            # The console's browser tests drive Debian's chromium through chromedriver.
            "selenium>=4.20",
            "ec2-metadata>=3.0",
        ],
        # bench/tftp.py's Python peer servers; bench/bootstorm.py's client loop.
        "bench": ["fbtftp>=0.5", "py3tftp>=1.3", "uvloop>=0.19"],
        "dev": ["ruff>=0.6", "mypy>=1.10", "mypy-zope>=1.0.5"],
    },
    entry_points={
        "console_scripts": ["metadatad-manage = metadatad.cli:main"],
    },
    zip_safe=False,
)
