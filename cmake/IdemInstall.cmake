# Install rules and the CMake package of idem, for every library target this build defines:
#   idem (idem::idem), idem_sqlite (idem::sqlite), idem_redis (idem::redis),
#   idem_kafka (idem::kafka), idem_rabbitmq (idem::rabbitmq), idem_log (idem::log)
# plus the idemctl tool. Included last by the top-level CMakeLists.txt when IDEM_INSTALL is on,
# so it sees every target; component CMakeLists need no install lines of their own.
#
# Produces, in <prefix>/<libdir>/cmake/idem and (for the build tree) in the binary dir:
#   idemConfig.cmake, idemConfigVersion.cmake, idem-targets.cmake,
#   idem-<component>-targets.cmake and idem-<component>-dependencies.cmake per component;
# and <prefix>/<libdir>/pkgconfig/idem.pc plus idem-<component>.pc.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(IDEM_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/idem
    CACHE STRING "Where idemConfig.cmake is installed, relative to the prefix")
set(IDEM_INSTALL_PKGCONFIGDIR ${CMAKE_INSTALL_LIBDIR}/pkgconfig
    CACHE STRING "Where idem.pc is installed, relative to the prefix")

# component -> target and the header globs (relative to include/idem) it owns.
set(_idem_all_components sqlite redis postgres kafka rabbitmq log)
set(_idem_target_sqlite idem_sqlite)
set(_idem_target_redis idem_redis)
set(_idem_target_postgres idem_postgres)
set(_idem_target_kafka idem_kafka)
set(_idem_target_rabbitmq idem_rabbitmq)
set(_idem_target_log idem_log)
set(_idem_headers_sqlite "sqlite*")
set(_idem_headers_redis "redis*")
set(_idem_headers_postgres "postgres*")
set(_idem_headers_kafka "kafka*")
set(_idem_headers_rabbitmq "rabbitmq*")
set(_idem_headers_log "stderr_logger.hpp")

set(IDEM_COMPONENTS "")
foreach(_comp IN LISTS _idem_all_components)
  if(TARGET ${_idem_target_${_comp}})
    list(APPEND IDEM_COMPONENTS ${_comp})
    # The exported name is idem::<component> whatever the component's CMakeLists says.
    set_target_properties(${_idem_target_${_comp}} PROPERTIES EXPORT_NAME ${_comp})
  endif()
endforeach()

# ---------------------------------------------------------------------------------------------
# Dependencies. A static library's PRIVATE dependencies (absl and xxhash for the core) appear in
# its INTERFACE_LINK_LIBRARIES as $<LINK_ONLY:...>, so the export carries them and consumers
# link them; the config must therefore recreate those imported targets. Each component's
# dependencies are derived here from its link interface, so a component that changes its C
# library needs no edit in this file.
#
# _idem_dependencies(<target> <cmake-code-var> <pc-requires-var> <pc-libs-var>)
function(_idem_dependencies target code_var requires_var libs_var)
  get_target_property(_libs ${target} INTERFACE_LINK_LIBRARIES)
  if(NOT _libs)
    set(_libs "")
  endif()
  set(_code "")
  set(_requires "")
  set(_plibs "")
  foreach(_lib IN LISTS _libs)
    if(_lib MATCHES "^\\$<LINK_ONLY:(.+)>$")
      set(_lib "${CMAKE_MATCH_1}")
    endif()
    if(_lib MATCHES "^\\$<" OR _lib MATCHES "^idem(::|_|$)")
      continue()  # other generator expressions; idem's own targets
    endif()
    if(_lib MATCHES "^PkgConfig::(.+)$")
      set(_var "${CMAKE_MATCH_1}")
      set(_module "${${_var}_MODULE_NAME}")
      if(NOT _module)
        string(TOLOWER "${_var}" _module)
      endif()
      string(APPEND _code "_idem_need_pkg_config(${_var} ${_module})\n")
      list(APPEND _requires ${_module})
    elseif(_lib STREQUAL "Threads::Threads")
      string(APPEND _code "_idem_need_package(Threads)\n")
      list(APPEND _plibs "-pthread")
    elseif(_lib MATCHES "^absl::(.+)$")
      string(APPEND _code "_idem_need_package(absl)\n")
      list(APPEND _requires "absl_${CMAKE_MATCH_1}")
    elseif(_lib MATCHES "^SQLite::")
      string(APPEND _code "_idem_need_package(SQLite3)\n")
      list(APPEND _requires sqlite3)
    elseif(_lib MATCHES "^fmt::")
      string(APPEND _code "_idem_need_package(fmt)\n")
      list(APPEND _requires fmt)
    elseif(_lib MATCHES "^hiredis::")
      string(APPEND _code "_idem_need_package(hiredis)\n")
      list(APPEND _requires hiredis)
    elseif(_lib MATCHES "^rabbitmq::")
      string(APPEND _code "_idem_need_package(rabbitmq-c)\n")
      list(APPEND _requires librabbitmq)
    elseif(_lib MATCHES "^RdKafka::")
      string(APPEND _code "_idem_need_package(RdKafka)\n")
      list(APPEND _requires rdkafka)
    elseif(_lib MATCHES "^([A-Za-z0-9_.+-]+)::")
      string(APPEND _code "_idem_need_package(${CMAKE_MATCH_1})\n")
      message(WARNING "idem install: ${target} links ${_lib}; the package config will call "
                      "find_package(${CMAKE_MATCH_1}) for it and idem-*.pc will not list it")
    elseif(_lib MATCHES "^-")
      list(APPEND _plibs "${_lib}")
    else()
      list(APPEND _plibs "-l${_lib}")
    endif()
  endforeach()
  # One find per package, however many of its targets are linked.
  string(REPLACE "\n" ";" _lines "${_code}")
  list(REMOVE_DUPLICATES _lines)
  list(REMOVE_ITEM _lines "")
  list(JOIN _lines "\n" _code)
  if(_code)
    string(APPEND _code "\n")
  endif()
  list(REMOVE_DUPLICATES _requires)
  list(REMOVE_DUPLICATES _plibs)
  string(REPLACE ";" ", " _requires "${_requires}")
  string(REPLACE ";" " " _plibs "${_plibs}")
  set(${code_var} "${_code}" PARENT_SCOPE)
  set(${requires_var} "${_requires}" PARENT_SCOPE)
  set(${libs_var} "${_plibs}" PARENT_SCOPE)
endfunction()

# Writes <dir>/idem-<name>-dependencies.cmake for the build tree and the install tree.
function(_idem_write_dependencies name target)
  _idem_dependencies(${target} _code _requires _libs)
  set(_file ${PROJECT_BINARY_DIR}/idem-${name}-dependencies.cmake)
  file(WRITE ${_file} "# Generated by cmake/IdemInstall.cmake: what idem::${name} links.\n${_code}")
  install(FILES ${_file} DESTINATION ${IDEM_INSTALL_CMAKEDIR})
endfunction()

# ---------------------------------------------------------------------------------------------
# Libraries, export sets and headers.
set(_idem_header_excludes "")
foreach(_comp IN LISTS _idem_all_components)
  list(APPEND _idem_header_excludes PATTERN "${_idem_headers_${_comp}}" EXCLUDE)
endforeach()

install(TARGETS idem EXPORT idem-targets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/idem DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
        FILES_MATCHING PATTERN "*.hpp" ${_idem_header_excludes})
install(EXPORT idem-targets FILE idem-targets.cmake NAMESPACE idem::
        DESTINATION ${IDEM_INSTALL_CMAKEDIR})
export(EXPORT idem-targets FILE ${PROJECT_BINARY_DIR}/idem-targets.cmake NAMESPACE idem::)
_idem_write_dependencies(core idem)

foreach(_comp IN LISTS IDEM_COMPONENTS)
  set(_target ${_idem_target_${_comp}})
  install(TARGETS ${_target} EXPORT idem-${_comp}-targets
          ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
          LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
          RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/idem DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
          FILES_MATCHING PATTERN "${_idem_headers_${_comp}}")
  install(EXPORT idem-${_comp}-targets FILE idem-${_comp}-targets.cmake NAMESPACE idem::
          DESTINATION ${IDEM_INSTALL_CMAKEDIR})
  export(EXPORT idem-${_comp}-targets FILE ${PROJECT_BINARY_DIR}/idem-${_comp}-targets.cmake
         NAMESPACE idem::)
  _idem_write_dependencies(${_comp} ${_target})
endforeach()

if(TARGET idemctl)
  install(TARGETS idemctl RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()

# ---------------------------------------------------------------------------------------------
# Package config and version. The same idemConfig.cmake serves the install tree and the build
# tree (export() above): it only refers to files beside itself.
configure_file(${PROJECT_SOURCE_DIR}/cmake/idemConfig.cmake.in
               ${PROJECT_BINARY_DIR}/idemConfig.cmake @ONLY)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/idemConfigVersion.cmake
                                 VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/idemConfig.cmake ${PROJECT_BINARY_DIR}/idemConfigVersion.cmake
        DESTINATION ${IDEM_INSTALL_CMAKEDIR})

# ---------------------------------------------------------------------------------------------
# pkg-config: idem.pc (the core) and idem-<component>.pc. The prefix is found from the .pc
# file's own location, so an installed tree can be moved. For a static build every dependency
# goes in Requires/Libs (plain `pkg-config --libs idem` links); for a shared one, private
# dependencies go in Requires.private.
file(RELATIVE_PATH _idem_pc_to_prefix
     ${CMAKE_INSTALL_PREFIX}/${IDEM_INSTALL_PKGCONFIGDIR} ${CMAKE_INSTALL_PREFIX})
string(REGEX REPLACE "/$" "" _idem_pc_to_prefix "${_idem_pc_to_prefix}")
function(_idem_write_pc name target description requires_idem)
  _idem_dependencies(${target} _code _requires _libs)
  get_target_property(_type ${target} TYPE)
  get_target_property(_output ${target} OUTPUT_NAME)
  if(NOT _output)
    set(_output ${target})
  endif()
  set(IDEM_PC_NAME ${name})
  set(IDEM_PC_DESCRIPTION "${description}")
  set(IDEM_PC_PREFIX "\${pcfiledir}/${_idem_pc_to_prefix}")
  set(IDEM_PC_REQUIRES "${requires_idem}")
  set(IDEM_PC_REQUIRES_PRIVATE "")
  if(_requires AND _type STREQUAL "STATIC_LIBRARY")
    if(IDEM_PC_REQUIRES)
      string(APPEND IDEM_PC_REQUIRES ", ")
    endif()
    string(APPEND IDEM_PC_REQUIRES "${_requires}")
  else()
    set(IDEM_PC_REQUIRES_PRIVATE "${_requires}")
  endif()
  set(IDEM_PC_LIBS "-l${_output} ${_libs}")
  configure_file(${PROJECT_SOURCE_DIR}/cmake/idem.pc.in ${PROJECT_BINARY_DIR}/${name}.pc @ONLY)
  install(FILES ${PROJECT_BINARY_DIR}/${name}.pc DESTINATION ${IDEM_INSTALL_PKGCONFIGDIR})
endfunction()

_idem_write_pc(idem idem "${PROJECT_DESCRIPTION}" "")
foreach(_comp IN LISTS IDEM_COMPONENTS)
  _idem_write_pc(idem-${_comp} ${_idem_target_${_comp}} "idem::${_comp}" "idem")
endforeach()

message(STATUS "idem package: core + components: ${IDEM_COMPONENTS}")
