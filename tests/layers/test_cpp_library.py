"""The shared build helper of the compiled kernels (``up2.layers.cpp_library``) and the
``python -m up2.layers.build_kernels`` command line, without compiling anything."""
import pytest

from up2.layers import build_kernels, cpp_library
from up2.layers.cpp_library import BUILD_DIR_ENV, CppLibrary


def test_each_kernel_is_its_own_library():
    libs = build_kernels.kernel_libraries()
    assert set(libs) == {"msda", "paste_masks"}
    names = {lib.name() for lib in libs.values()}
    assert len(names) == 2 and all(len({s.name for s in lib.sources}) == 1 for lib in libs.values())
    assert {s.name for lib in libs.values() for s in lib.sources} == {"ms_deform_attn_cpu.cpp", "paste_masks_cpu.cpp"}


def test_name_hashes_the_sources_and_path_follows_the_build_dir(tmp_path, monkeypatch):
    one, two, same = tmp_path / "one.cpp", tmp_path / "two.cpp", tmp_path / "same.cpp"
    one.write_text("// one\n")
    two.write_text("// two\n")
    same.write_text("// one\n")
    first, second, third = (CppLibrary("k", "up2_k_", [str(s)], "test kernel").name() for s in (one, two, same))
    assert first.startswith("up2_k_") and second.startswith("up2_k_")
    assert first != second and first == third  # the name hashes the content, not the file name
    src = two
    monkeypatch.setenv(BUILD_DIR_ENV, str(tmp_path / "out"))
    lib = CppLibrary("k", "up2_k_", [str(src)], "test kernel")
    assert lib.path() == tmp_path / "out" / second / f"{second}.so"


def test_unbuilt_or_sourceless_library_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv(BUILD_DIR_ENV, str(tmp_path / "out"))
    src = tmp_path / "k.cpp"
    src.write_text("// never built\n")
    lib = CppLibrary("k", "up2_k_", [str(src)], "test kernel")
    reason = lib.unavailable_reason()
    assert reason.startswith("not built") and "python -m up2.layers.build_kernels k" in reason
    missing = CppLibrary("m", "up2_m_", [str(tmp_path / "absent.cpp")], "test kernel")
    assert missing.unavailable_reason().startswith("kernel sources not found")


def test_build_without_a_compiler_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(BUILD_DIR_ENV, str(tmp_path / "out"))
    monkeypatch.setattr(cpp_library, "compiler_available", lambda: False)
    src = tmp_path / "k.cpp"
    src.write_text("// needs a compiler\n")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        CppLibrary("k", "up2_k_", [str(src)], "test kernel").build()


def test_command_line_refuses_unknown_kernels(capsys):
    with pytest.raises(SystemExit) as e:
        build_kernels.main(["nope"])
    assert e.value.code == 2 and "unknown kernel(s) nope" in capsys.readouterr().err


def test_command_line_reports_a_failed_build(tmp_path, monkeypatch, capsys):
    """A kernel that cannot be built: exit status 1 and a message, the other kernels still tried."""
    monkeypatch.setenv(BUILD_DIR_ENV, str(tmp_path / "out"))  # nothing built there
    monkeypatch.setattr(cpp_library, "compiler_available", lambda: False)
    assert build_kernels.main([]) == 1
    err = capsys.readouterr().err
    assert "msda failed" in err and "paste_masks failed" in err
