# `cmake --build <dir> --target docs`: HTML API reference from the public headers and docs/,
# with Doxygen. The target exists only when Doxygen is installed (it is optional), and only in
# a top-level build, so that a parent project's own `docs` target never clashes with ours.
if(NOT PROJECT_IS_TOP_LEVEL)
  return()
endif()
find_package(Doxygen QUIET)
if(DOXYGEN_FOUND AND NOT TARGET docs)
  set(IDEM_DOXYGEN_OUTPUT ${PROJECT_BINARY_DIR}/docs)
  configure_file(${PROJECT_SOURCE_DIR}/docs/Doxyfile.in ${PROJECT_BINARY_DIR}/Doxyfile @ONLY)
  add_custom_target(docs
    COMMAND ${DOXYGEN_EXECUTABLE} ${PROJECT_BINARY_DIR}/Doxyfile
    WORKING_DIRECTORY ${PROJECT_SOURCE_DIR}
    COMMENT "Doxygen: HTML in ${IDEM_DOXYGEN_OUTPUT}/html/index.html"
    VERBATIM)
endif()
