"""Plain helpers the tests import (``from helpers.storage import Clock``): builders, clocks, PostgreSQL
databases, purchase and scenario helpers. Fixtures are not here: they live in the ``conftest.py`` files."""
