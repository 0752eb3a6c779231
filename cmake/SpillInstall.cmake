# `cmake --install` rules: the C API header, libspill.so (versioned, with a SONAME), the `spill`
# command (with the trainer's libspill_train.so), a CMake package (find_package(spill) gives spill::spill), a pkg-config file and the
# Python package. Consumers of the C API need spill/spill.h only; no internal header is
# installed. Every installed file finds the others relative to itself, so a prefix can be moved.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(SPILL_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/spill" CACHE STRING
    "Where spillConfig.cmake goes, relative to the prefix")
set(SPILL_INSTALL_PYTHONDIR "lib/python3/dist-packages" CACHE STRING
    "Where the Python package `spill` goes, relative to the prefix (Debian's layout)")

# Before 1.0 every minor release may change the ABI, so the SONAME carries major.minor.
if(PROJECT_VERSION_MAJOR EQUAL 0)
  set(SPILL_SOVERSION ${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR})
  set(spill_compatibility SameMinorVersion)
else()
  set(SPILL_SOVERSION ${PROJECT_VERSION_MAJOR})
  set(spill_compatibility SameMajorVersion)
endif()

# The build tree's RPATH points at the CUDA runtime that was linked; the installed copies keep
# that directory (it is outside the project) and the command also looks in ../lib.
set_target_properties(spill PROPERTIES VERSION ${PROJECT_VERSION} SOVERSION ${SPILL_SOVERSION}
                                       INSTALL_RPATH_USE_LINK_PATH ON)
set_target_properties(spill_train PROPERTIES VERSION ${PROJECT_VERSION} SOVERSION ${SPILL_SOVERSION}
                                             INSTALL_RPATH "$ORIGIN" INSTALL_RPATH_USE_LINK_PATH ON)
set_target_properties(spill-cli PROPERTIES INSTALL_RPATH "$ORIGIN/../${CMAKE_INSTALL_LIBDIR}"
                                           INSTALL_RPATH_USE_LINK_PATH ON)

install(TARGETS spill EXPORT spillTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
# The trainer library is the command's, not an API: no development link, no CMake target.
install(TARGETS spill_train LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} NAMELINK_SKIP)
install(TARGETS spill-cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
# A snapshot's pickle for PyTorch's memory_viz (standard-library Python).
install(PROGRAMS ${CMAKE_SOURCE_DIR}/tools/snapshot_to_pickle.py DESTINATION ${CMAKE_INSTALL_BINDIR}
        RENAME spill-snapshot-to-pickle)
install(FILES ${CMAKE_SOURCE_DIR}/integrations/c/spill/spill.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/spill)

install(EXPORT spillTargets NAMESPACE spill:: DESTINATION ${SPILL_INSTALL_CMAKEDIR})
configure_package_config_file(${CMAKE_SOURCE_DIR}/cmake/spillConfig.cmake.in
                              ${CMAKE_BINARY_DIR}/install/spillConfig.cmake
                              INSTALL_DESTINATION ${SPILL_INSTALL_CMAKEDIR})
write_basic_package_version_file(${CMAKE_BINARY_DIR}/install/spillConfigVersion.cmake
                                 COMPATIBILITY ${spill_compatibility})
install(FILES ${CMAKE_BINARY_DIR}/install/spillConfig.cmake
              ${CMAKE_BINARY_DIR}/install/spillConfigVersion.cmake
        DESTINATION ${SPILL_INSTALL_CMAKEDIR})

# spill_relative_dir(OUT FROM TO): TO seen from FROM, both relative to the prefix when they are
# relative paths (an absolute one stays absolute).
function(spill_relative_dir out from to)
  if(IS_ABSOLUTE "${to}")
    set(${out} "${to}" PARENT_SCOPE)
    return()
  endif()
  if(IS_ABSOLUTE "${from}")
    set(${out} "${CMAKE_INSTALL_PREFIX}/${to}" PARENT_SCOPE)
    return()
  endif()
  file(RELATIVE_PATH rel "/prefix/${from}" "/prefix/${to}")
  string(REGEX REPLACE "/$" "" rel "${rel}")
  if(rel STREQUAL "")
    set(rel ".")
  endif()
  set(${out} "${rel}" PARENT_SCOPE)
endfunction()

# pkg-config: the prefix is found from the .pc file's own folder.
spill_relative_dir(SPILL_PC_PREFIX "${CMAKE_INSTALL_LIBDIR}/pkgconfig" "")
if(NOT IS_ABSOLUTE "${SPILL_PC_PREFIX}")
  set(SPILL_PC_PREFIX "\${pcfiledir}/${SPILL_PC_PREFIX}")
endif()
foreach(kind LIBDIR INCLUDEDIR)
  if(IS_ABSOLUTE "${CMAKE_INSTALL_${kind}}")
    set(SPILL_PC_${kind} "${CMAKE_INSTALL_${kind}}")
  else()
    set(SPILL_PC_${kind} "\${prefix}/${CMAKE_INSTALL_${kind}}")
  endif()
endforeach()
configure_file(${CMAKE_SOURCE_DIR}/cmake/spill.pc.in ${CMAKE_BINARY_DIR}/install/spill.pc @ONLY)
install(FILES ${CMAKE_BINARY_DIR}/install/spill.pc
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

# The Python package, plus _install.py telling it where the library folder is.
spill_relative_dir(SPILL_PY_LIBRARY_DIR "${SPILL_INSTALL_PYTHONDIR}/spill" "${CMAKE_INSTALL_LIBDIR}")
configure_file(${CMAKE_SOURCE_DIR}/cmake/spill_install.py.in ${CMAKE_BINARY_DIR}/install/_install.py
               @ONLY)
install(DIRECTORY ${CMAKE_SOURCE_DIR}/python/spill DESTINATION ${SPILL_INSTALL_PYTHONDIR}
        PATTERN __pycache__ EXCLUDE PATTERN "*.pyc" EXCLUDE)
install(FILES ${CMAKE_BINARY_DIR}/install/_install.py
        DESTINATION ${SPILL_INSTALL_PYTHONDIR}/spill)

# spill.torch compiles its shims at first use when none was built for the running torch: the
# sources and the C API header travel with the Python package.
install(FILES ${CMAKE_SOURCE_DIR}/integrations/torch/torch_cuda_shim.cpp
              ${CMAKE_SOURCE_DIR}/integrations/torch/torch_cpu_bridge.cpp
        DESTINATION ${SPILL_INSTALL_PYTHONDIR}/spill/torch/_csrc)
install(FILES ${CMAKE_SOURCE_DIR}/integrations/c/spill/spill.h
        DESTINATION ${SPILL_INSTALL_PYTHONDIR}/spill/torch/_csrc/include/spill)
