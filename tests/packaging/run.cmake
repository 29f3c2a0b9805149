# cmake -DMODE=find_package|add_subdirectory -DWORK_DIR=... -DPROJECT_DIR=... -P run.cmake
# (see CMakeLists.txt beside this file for the other -D arguments).
cmake_minimum_required(VERSION 3.21)

function(run)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}\n${out}")
  endif()
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})
set(configure_args -G ${GENERATOR} -DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}
                   -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=${BUILD_TYPE}
                   "-DCMAKE_CXX_FLAGS=${EXTRA_FLAGS}"
                   "-DCMAKE_EXE_LINKER_FLAGS=${EXTRA_FLAGS}")
if(GTEST_DIR)
  list(APPEND configure_args -DGTest_DIR=${GTEST_DIR})
endif()

if(MODE STREQUAL "find_package")
  set(prefix ${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} --install ${IDEM_BUILD_DIR} --prefix ${prefix})

  # The test must cover every component the package has: one missing from COMPONENTS (the list
  # in CMakeLists.txt beside this file) would be installed and never tried.
  file(GLOB_RECURSE config_file ${prefix}/idemConfig.cmake)
  if(NOT config_file)
    message(FATAL_ERROR "idemConfig.cmake was not installed under ${prefix}")
  endif()
  file(READ ${config_file} config)
  if(NOT config MATCHES "\nset\\(_idem_built_components ([^)\n]*)\\)")
    message(FATAL_ERROR "${config_file} does not list its components")
  endif()
  set(built "${CMAKE_MATCH_1}")
  string(REPLACE "|" ";" tested "${COMPONENTS}")
  foreach(component IN LISTS built)
    if(NOT component IN_LIST tested)
      message(FATAL_ERROR "the installed package has component ${component}, which "
                          "tests/packaging does not test: add it to _idem_pkg_components in "
                          "tests/packaging/CMakeLists.txt and use it in find-package-test")
    endif()
  endforeach()

  # With every component built, the installed headers are exactly the source tree's (each
  # installed once, by its owner, is checked when idem is configured).
  if(COMPONENTS STREQUAL ALL_COMPONENTS)
    file(GLOB_RECURSE source_headers RELATIVE ${IDEM_SOURCE_DIR}/include
         ${IDEM_SOURCE_DIR}/include/*.hpp)
    file(GLOB_RECURSE installed_headers RELATIVE ${prefix}/include ${prefix}/include/*.hpp)
    list(SORT source_headers)
    list(SORT installed_headers)
    if(NOT source_headers STREQUAL installed_headers)
      set(missing ${source_headers})
      list(REMOVE_ITEM missing ${installed_headers})
      set(extra ${installed_headers})
      list(REMOVE_ITEM extra ${source_headers})
      message(FATAL_ERROR "installed headers differ from include/: missing ${missing}; "
                          "extra ${extra}")
    endif()
  endif()

  run(${CMAKE_COMMAND} -S ${PROJECT_DIR} -B ${WORK_DIR}/build ${configure_args}
      -DCMAKE_PREFIX_PATH=${prefix} "-DIDEM_TEST_COMPONENTS=${COMPONENTS}")
  message(STATUS "${last_output}")
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
  run(${WORK_DIR}/build/consumer)
  message(STATUS "find_package consumer: ${last_output}")
  run(${WORK_DIR}/build/suites --gtest_brief=1)
  message(STATUS "installed conformance suites: ${last_output}")
  if(EXISTS ${WORK_DIR}/build/open-store-only/open_store_only)
    run(${WORK_DIR}/build/open-store-only/open_store_only)
    message(STATUS "find_package consumer of idem::open_store alone: ${last_output}")
  endif()

  # The same program through pkg-config, as a non-CMake build would do it: the core alone, then
  # with every component (idem-<component>.pc, each pulling in what it needs).
  find_program(PKG_CONFIG NAMES pkg-config REQUIRED)
  file(GLOB_RECURSE pc_file ${prefix}/idem.pc)
  if(NOT pc_file)
    message(FATAL_ERROR "idem.pc was not installed under ${prefix}")
  endif()
  get_filename_component(pc_dir ${pc_file} DIRECTORY)
  set(ENV{PKG_CONFIG_PATH} ${pc_dir})
  # A shared build (-DBUILD_SHARED_LIBS=ON) needs the prefix on the loader's path.
  run(${PKG_CONFIG} --variable=libdir idem)
  string(STRIP "${last_output}" pc_libdir)
  set(ENV{LD_LIBRARY_PATH} "${pc_libdir}:$ENV{LD_LIBRARY_PATH}")
  separate_arguments(extra UNIX_COMMAND "${EXTRA_FLAGS}")

  set(modules "")
  set(defines "")
  foreach(component IN LISTS tested)
    string(TOUPPER ${component} upper)
    list(APPEND modules idem-${component})
    list(APPEND defines -DIDEM_TEST_HAVE_${upper})
  endforeach()
  foreach(variant core all)
    if(variant STREQUAL "core")
      set(variant_modules idem)
      set(variant_defines "")
    else()
      set(variant_modules idem ${modules})
      set(variant_defines ${defines})
    endif()
    run(${PKG_CONFIG} --cflags --libs ${variant_modules})
    string(STRIP "${last_output}" pc_flags)
    separate_arguments(pc_flags UNIX_COMMAND "${pc_flags}")
    run(${CXX_COMPILER} -std=c++20 ${extra} ${variant_defines} ${PROJECT_DIR}/main.cpp
        -o ${WORK_DIR}/pc-consumer-${variant} ${pc_flags})
    run(${WORK_DIR}/pc-consumer-${variant})
    message(STATUS "pkg-config consumer (${variant_modules}: ${pc_flags}): ${last_output}")
  endforeach()
elseif(MODE STREQUAL "add_subdirectory")
  run(${CMAKE_COMMAND} -S ${PROJECT_DIR} -B ${WORK_DIR}/build ${configure_args}
      -DIDEM_SOURCE_DIR=${IDEM_SOURCE_DIR})
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
  run(${WORK_DIR}/build/consumer)
  message(STATUS "add_subdirectory consumer: ${last_output}")
else()
  message(FATAL_ERROR "MODE must be find_package or add_subdirectory")
endif()
