"""What the app tests need beyond the dev extra, as session fixtures: each is got (installed if missing) once per
session, or the tests that use it skip with one line saying why and where the install log is."""

import pytest

from tests.support import provision


@pytest.fixture(scope="session")
def comfyui_install():
    """The folder of real ComfyUI 0.30.0 and its own venv (for tests marked `comfyui`)."""
    try:
        return provision.comfyui()
    except provision.Unavailable as reason:
        pytest.skip(str(reason))


@pytest.fixture(scope="session")
def chromium_path():
    """The path of a Chromium that Playwright can drive (for tests marked `browser`)."""
    try:
        return provision.chromium()
    except provision.Unavailable as reason:
        pytest.skip(str(reason))
