"""Make BlenderProc 2.8.0 work inside a plain Python process that has ``bpy`` (the PyPI module).

This file is the ONLY place in the project that knows these quirks. Delete it (and call
``import blenderproc; blenderproc.init()`` directly) once a BlenderProc release supports an
external ``bpy`` module (upstream's unreleased ``USE_EXTERNAL_BPY_MODULE`` mode).

What BlenderProc 2.8.0 does on ``import blenderproc`` and why that fails here
------------------------------------------------------------------------------
1. Without ``INSIDE_OF_THE_INTERNAL_BLENDER_PYTHON_ENVIRONMENT`` (set only by its own launcher in
   the Blender it downloads) it imports *nothing* of its API and raises "This script can only be
   run by blenderproc run" unless the process was started as ``blenderproc``/``python -m`` or
   ``OUTSIDE_OF_THE_INTERNAL_BLENDER_PYTHON_ENVIRONMENT_BUT_IN_RUN_SCRIPT`` is set.
2. With ``INSIDE_OF_...`` set it removes site-packages from ``sys.path``, and its
   ``SetupUtility.setup`` pip-installs pinned packages into a folder next to "Blender's" Python
   (derived from ``sys.executable``: here, inside the venv's parents) and parses Blender's ``--``
   command-line arguments. None of that is wanted in a venv.
3. ``blenderproc.init()`` sets ``preferences.view.language = "en_US"``; the ``bpy`` wheel ships
   no translations, so the enum only holds ``'DEFAULT'`` and the assignment raises ``TypeError``.
4. ``Utility.temp_dir`` (where renders and EXR passes land unless told otherwise) is set by
   ``SetupUtility.setup``; left alone it is ``""``, i.e. the current directory.
5. Its API modules import ``trimesh``, ``imageio`` and ``cv2`` at import time (BlenderProc
   normally pip-installs them into Blender's own Python); in a venv they must be installed
   (``opencv-python-headless``, ``imageio``, ``trimesh``), and ``cv2`` reads the EXR passes.

What :func:`load_blenderproc` does instead
------------------------------------------
* imports ``bpy`` first (BlenderProc's modules ``import bpy`` themselves);
* sets ``..._BUT_IN_RUN_SCRIPT`` so the guard in (1) passes without taking branch (2), imports
  the API modules that branch would have imported and binds them on the package, exactly as
  ``blenderproc/__init__.py`` does (``bproc.loader``, ``bproc.camera``, ``bproc.renderer``, ...);
  ``sys.path`` is restored afterwards in case anything touched it;
* points ``Utility.temp_dir`` at a private temporary directory;
* runs the body of ``blenderproc.init()`` minus the language switch (``"DEFAULT"`` *is*
  English in the wheel) and binds it as ``bproc.init``/``bproc.clean_up``.

Also observed (not fixed here; designed around): a process that imported BlenderProc's API on
``bpy`` segfaults at interpreter exit (status 139) even when every render succeeded. gdb shows
the cause is in the ``bpy`` wheel, not BlenderProc: after Python has finalised, C ``exit()`` runs
the destructor of Blender's static ``SpaceType`` registry, which frees Python-registered UI
classes through ``bpy_class_free`` -> ``PyGILState_Ensure`` with no interpreter left
(``PyThreadState_New(interp=NULL)``). Whether it fires depends on what was imported (plain
``import bpy`` exits cleanly; importing e.g. ``blenderproc.python.material.MaterialLoaderUtility``
is enough). Never read success from the exit status of such a process; leave it with
``os._exit`` after flushing outputs (``geco.render.blender.server`` does).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
from types import ModuleType

SUPPORTED_VERSION = "2.8.0"
_GUARD_ENV = "OUTSIDE_OF_THE_INTERNAL_BLENDER_PYTHON_ENVIRONMENT_BUT_IN_RUN_SCRIPT"
# The API modules blenderproc/__init__.py imports inside Blender, in its order. All but
# ``writer`` are bound eagerly; ``writer`` (BOP/COCO/HDF5 writers) also needs pypng and
# scikit-image, which GECO does not use, so it is imported on first access only.
_API_MODULES = ("loader", "utility", "sampler", "math", "postprocessing", "material",
                "lighting", "camera", "renderer", "world", "constructor", "types", "object", "filter")
_LAZY_API_MODULES = ("writer",)
# Import-time dependencies BlenderProc normally pip-installs into Blender's own Python.
_REQUIRED = {"trimesh": "trimesh", "imageio": "imageio", "cv2": "opencv-python-headless"}

_bproc: ModuleType | None = None


class BlenderProcUnavailable(RuntimeError):
    """BlenderProc cannot be set up in this process (missing package, wrong version, ...)."""


def _check_dependencies() -> None:
    missing = [package for module, package in _REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise BlenderProcUnavailable(
            "BlenderProc 2.8.0 imports these at import time but they are not installed: "
            + ", ".join(missing) + " (pip install them, or install geco[render])")
    # BlenderProc reads its depth/normal passes (OpenEXR) with OpenCV. OpenCV reads EXR only with
    # this set before its first EXR read, and only if built with OpenEXR: the PyPI wheels of the
    # 4.10 line are, the 5.x wheels are not.
    os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"
    import cv2

    if "OpenEXR: NO" in " ".join(cv2.getBuildInformation().split()):
        raise BlenderProcUnavailable(
            f"OpenCV {cv2.__version__} was built without OpenEXR, so BlenderProc cannot read its depth "
            "and normal passes; install opencv-python-headless==4.10.0.84")


def _init_without_language_switch(bproc: ModuleType) -> None:
    """``blenderproc.init()`` (2.8.0) without the ``language = "en_US"`` assignment."""
    import random

    import bpy
    from blenderproc.python.renderer import RendererUtility
    from blenderproc.python.utility.GlobalStorage import GlobalStorage
    from blenderproc.python.utility.Initializer import _Initializer, clean_up
    from numpy import random as np_random

    if GlobalStorage.is_in_storage("bproc_init_complete") and GlobalStorage.get("bproc_init_complete"):
        return
    clean_up(clean_up_camera=True)
    bpy.context.scene.render.engine = "CYCLES"
    RendererUtility.set_render_devices()
    _Initializer.set_default_parameters()
    seed = os.getenv("BLENDER_PROC_RANDOM_SEED")
    if seed:
        random.seed(int(seed))
        np_random.seed(int(seed))
    GlobalStorage.add("bproc_init_complete", True)


def load_blenderproc(temp_dir: str | None = None) -> ModuleType:
    """Return the ``blenderproc`` module with its API bound and the scene initialised.

    Idempotent: later calls return the same module. ``temp_dir`` is where BlenderProc writes
    intermediate files (default: a fresh private temporary directory).
    """
    global _bproc
    if _bproc is not None:
        return _bproc
    try:
        import bpy  # noqa: F401  (must be importable before BlenderProc's modules)
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BlenderProcUnavailable(f"bpy is not importable: {e} (pip install bpy==4.2.0)") from e
    _check_dependencies()
    # OpenCV reads EXR only with this set before its first read (blenderproc/__init__ sets it too).
    os.environ["OPENCV_IO_ENABLE_OPENEXR"] = "1"

    saved_path = list(sys.path)
    os.environ.setdefault(_GUARD_ENV, "1")
    try:
        import blenderproc as bproc
    except Exception as e:  # pragma: no cover
        raise BlenderProcUnavailable(f"import blenderproc failed: {e}") from e
    version = getattr(bproc, "__version__", "?")
    if version != SUPPORTED_VERSION:
        raise BlenderProcUnavailable(
            f"geco.render.blender.adapter supports BlenderProc {SUPPORTED_VERSION}, found {version}; "
            "check whether the new release supports an external bpy and retire this adapter")
    if not hasattr(bproc, "renderer"):  # branch (2) did not run: bind the API ourselves
        for name in _API_MODULES:
            setattr(bproc, name, importlib.import_module(f"blenderproc.api.{name}"))

        def _lazy_api(name: str):  # PEP 562 module __getattr__
            if name in _LAZY_API_MODULES:
                module = importlib.import_module(f"blenderproc.api.{name}")
                setattr(bproc, name, module)
                return module
            raise AttributeError(f"module 'blenderproc' has no attribute {name!r}")

        bproc.__getattr__ = _lazy_api
    sys.path[:] = saved_path

    from blenderproc.python.utility.Initializer import clean_up
    from blenderproc.python.utility.Utility import Utility

    Utility.temp_dir = temp_dir or tempfile.mkdtemp(prefix="geco-bproc-")
    os.makedirs(Utility.temp_dir, exist_ok=True)
    _init_without_language_switch(bproc)
    bproc.init = lambda clean_up_scene=True: _init_without_language_switch(bproc)  # idempotent
    bproc.clean_up = clean_up
    _bproc = bproc
    return bproc
