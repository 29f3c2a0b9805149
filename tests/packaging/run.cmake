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

if(MODE STREQUAL "find_package")
  set(prefix ${WORK_DIR}/prefix)
  run(${CMAKE_COMMAND} --install ${IDEM_BUILD_DIR} --prefix ${prefix})
  run(${CMAKE_COMMAND} -S ${PROJECT_DIR} -B ${WORK_DIR}/build ${configure_args}
      -DCMAKE_PREFIX_PATH=${prefix} "-DIDEM_TEST_COMPONENTS=${COMPONENTS}")
  message(STATUS "${last_output}")
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
  run(${WORK_DIR}/build/consumer)
  message(STATUS "find_package consumer: ${last_output}")

  # The same program (core only) through pkg-config, as a non-CMake build would do it.
  find_program(PKG_CONFIG NAMES pkg-config REQUIRED)
  file(GLOB_RECURSE pc_file ${prefix}/idem.pc)
  if(NOT pc_file)
    message(FATAL_ERROR "idem.pc was not installed under ${prefix}")
  endif()
  get_filename_component(pc_dir ${pc_file} DIRECTORY)
  set(ENV{PKG_CONFIG_PATH} ${pc_dir})
  run(${PKG_CONFIG} --cflags --libs idem)
  string(STRIP "${last_output}" pc_flags)
  separate_arguments(pc_flags UNIX_COMMAND "${pc_flags}")
  separate_arguments(extra UNIX_COMMAND "${EXTRA_FLAGS}")
  run(${CXX_COMPILER} -std=c++20 ${extra} ${PROJECT_DIR}/main.cpp -o ${WORK_DIR}/pc-consumer
      ${pc_flags})
  # A shared build (-DBUILD_SHARED_LIBS=ON) needs the prefix on the loader's path.
  run(${PKG_CONFIG} --variable=libdir idem)
  string(STRIP "${last_output}" pc_libdir)
  set(ENV{LD_LIBRARY_PATH} "${pc_libdir}:$ENV{LD_LIBRARY_PATH}")
  run(${WORK_DIR}/pc-consumer)
  message(STATUS "pkg-config consumer (${pc_flags}): ${last_output}")
elseif(MODE STREQUAL "add_subdirectory")
  run(${CMAKE_COMMAND} -S ${PROJECT_DIR} -B ${WORK_DIR}/build ${configure_args}
      -DIDEM_SOURCE_DIR=${IDEM_SOURCE_DIR})
  run(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
  run(${WORK_DIR}/build/consumer)
  message(STATUS "add_subdirectory consumer: ${last_output}")
else()
  message(FATAL_ERROR "MODE must be find_package or add_subdirectory")
endif()
