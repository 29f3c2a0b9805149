# Install rules and the CMake package of idem, for every library target this build defines:
#   idem (idem::idem), idem_sqlite (idem::sqlite), idem_redis (idem::redis),
#   idem_postgres (idem::postgres), idem_kafka (idem::kafka), idem_rabbitmq (idem::rabbitmq),
#   idem_log (idem::log), idem_open_store (idem::open_store, which links the store components
#   this build has)
# plus the idemctl tool. Included last by the top-level CMakeLists.txt when IDEM_INSTALL is on,
# so it sees every target; component CMakeLists need no install lines of their own.
#
# Headers: each header under include/idem is installed once, by the component whose name
# globs below claim it (so outbox/sqlite_outbox.hpp goes with idem::sqlite, the library that
# compiles src/outbox/sqlite_outbox.cpp), the rest by the core. Configuring fails when a header
# includes one that its owner does not link (a core header including a component's header).
#
# Produces, in <prefix>/<libdir>/cmake/idem and (for the build tree) in the binary dir:
#   idemConfig.cmake, idemConfigVersion.cmake, idem-targets.cmake,
#   idem-<component>-targets.cmake and idem-<component>-dependencies.cmake per component;
# and <prefix>/<libdir>/pkgconfig/idem.pc plus idem-<component>.pc (idem-open_store.pc ...).
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(IDEM_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/idem
    CACHE STRING "Where idemConfig.cmake is installed, relative to the prefix")
set(IDEM_INSTALL_PKGCONFIGDIR ${CMAKE_INSTALL_LIBDIR}/pkgconfig
    CACHE STRING "Where idem.pc is installed, relative to the prefix")

# component -> target and the header globs it owns (file names, matched in include/idem and
# its subdirectories: "sqlite*" is sqlite.hpp, stores/sqlite_store.hpp, outbox/sqlite_outbox.hpp).
set(_idem_all_components sqlite redis postgres kafka rabbitmq log open_store)
set(_idem_target_sqlite idem_sqlite)
set(_idem_target_redis idem_redis)
set(_idem_target_postgres idem_postgres)
set(_idem_target_kafka idem_kafka)
set(_idem_target_rabbitmq idem_rabbitmq)
set(_idem_target_log idem_log)
set(_idem_target_open_store idem_open_store)
set(_idem_headers_sqlite "sqlite*")
set(_idem_headers_redis "redis*")
set(_idem_headers_postgres "postgres*")
set(_idem_headers_kafka "kafka*")
set(_idem_headers_rabbitmq "rabbitmq*")
set(_idem_headers_log "stderr_logger.hpp")
set(_idem_headers_open_store "open_store.hpp" "store_url.hpp")

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
# library needs no edit in this file. Another idem component in the link interface (idem::sqlite
# for idem::open_store) becomes _idem_need_component(sqlite), which loads it first, and the
# pkg-config module idem-sqlite.
#
# _idem_dependencies(<target> <cmake-code-var> <pc-requires-var> <pc-libs-var>
#                    <pc-idem-requires-var>)
function(_idem_dependencies target code_var requires_var libs_var idem_requires_var)
  get_target_property(_libs ${target} INTERFACE_LINK_LIBRARIES)
  if(NOT _libs)
    set(_libs "")
  endif()
  set(_code "")
  set(_requires "")
  set(_plibs "")
  set(_idem_requires "")
  foreach(_lib IN LISTS _libs)
    if(_lib MATCHES "^\\$<LINK_ONLY:(.+)>$")
      set(_lib "${CMAKE_MATCH_1}")
    endif()
    if(_lib MATCHES "^\\$<" OR _lib STREQUAL "idem::idem" OR _lib STREQUAL "idem")
      continue()  # other generator expressions; the core (always loaded, always required)
    endif()
    if(_lib MATCHES "^idem(::|_)(.+)$")
      set(_comp "${CMAKE_MATCH_2}")
      if(NOT _comp IN_LIST _idem_all_components)
        message(FATAL_ERROR "idem install: ${target} links ${_lib}, which is no component "
                            "this file knows (_idem_all_components)")
      endif()
      string(APPEND _code "_idem_need_component(${_comp})\n")
      list(APPEND _idem_requires idem-${_comp})
      continue()
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
  list(REMOVE_DUPLICATES _idem_requires)
  string(REPLACE ";" ", " _idem_requires "${_idem_requires}")
  set(${idem_requires_var} "${_idem_requires}" PARENT_SCOPE)
endfunction()

# Writes <dir>/idem-<name>-dependencies.cmake for the build tree and the install tree.
function(_idem_write_dependencies name target)
  _idem_dependencies(${target} _code _requires _libs _idem_requires)
  set(_file ${PROJECT_BINARY_DIR}/idem-${name}-dependencies.cmake)
  file(WRITE ${_file} "# Generated by cmake/IdemInstall.cmake: what idem::${name} links.\n${_code}")
  install(FILES ${_file} DESTINATION ${IDEM_INSTALL_CMAKEDIR})
endfunction()

# ---------------------------------------------------------------------------------------------
# Headers: who owns each one. _idem_headers_of_<owner> (core or a component) lists the paths
# relative to include/, and _idem_owner_of_<path> names the owner.
file(GLOB_RECURSE _idem_all_headers CONFIGURE_DEPENDS RELATIVE ${PROJECT_SOURCE_DIR}/include
     ${PROJECT_SOURCE_DIR}/include/idem/*.hpp)
list(SORT _idem_all_headers)
set(_idem_headers_of_core "")
foreach(_comp IN LISTS _idem_all_components)
  set(_idem_headers_of_${_comp} "")
endforeach()
foreach(_header IN LISTS _idem_all_headers)
  get_filename_component(_name ${_header} NAME)
  set(_owner core)
  foreach(_comp IN LISTS _idem_all_components)
    foreach(_glob IN LISTS _idem_headers_${_comp})
      string(REPLACE "." "\\." _regex "${_glob}")
      string(REPLACE "*" ".*" _regex "${_regex}")
      if(_name MATCHES "^${_regex}$" AND NOT _owner STREQUAL _comp)
        if(NOT _owner STREQUAL "core")
          message(FATAL_ERROR "idem install: include/${_header} is claimed by the header globs "
                              "of both ${_owner} and ${_comp}; give it one owner")
        endif()
        set(_owner ${_comp})
      endif()
    endforeach()
  endforeach()
  list(APPEND _idem_headers_of_${_owner} ${_header})
  set(_idem_owner_of_${_header} ${_owner})
endforeach()

# A header may include the core's headers, its own component's, and those of the components its
# owner links (idem::open_store's may include idem::sqlite's). Anything else would install a
# header that does not compile for a user who links its owner alone.
foreach(_header IN LISTS _idem_all_headers)
  set(_owner ${_idem_owner_of_${_header}})
  set(_allowed core ${_owner})
  if(NOT _owner STREQUAL "core")
    if(NOT TARGET ${_idem_target_${_owner}})
      continue()  # not built, not installed
    endif()
    get_target_property(_links ${_idem_target_${_owner}} INTERFACE_LINK_LIBRARIES)
    foreach(_lib IN LISTS _links)
      if(_lib MATCHES "^(\\$<LINK_ONLY:)?idem(::|_)([A-Za-z0-9_]+)>?$")
        list(APPEND _allowed ${CMAKE_MATCH_3})
      endif()
    endforeach()
  endif()
  file(STRINGS ${PROJECT_SOURCE_DIR}/include/${_header} _includes
       REGEX "^[ \t]*#[ \t]*include[ \t]*[<\"]idem/")
  foreach(_line IN LISTS _includes)
    string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]*[<\"]([^>\"]+)[>\"].*$" "\\1" _included
                         "${_line}")
    set(_included_owner "${_idem_owner_of_${_included}}")
    if(NOT _included_owner)
      message(FATAL_ERROR "idem install: include/${_header} includes ${_included}, which is not "
                          "a header under include/")
    endif()
    if(NOT _included_owner IN_LIST _allowed)
      if(_owner STREQUAL "core")
        set(_fix "a core header may include core headers only")
      else()
        set(_fix "make idem::${_owner} link idem::${_included_owner}")
      endif()
      message(FATAL_ERROR "idem install: include/${_header} (installed with ${_owner}) includes "
                          "${_included}, which belongs to ${_included_owner}: give the header to "
                          "${_included_owner} (the header globs in cmake/IdemInstall.cmake), or "
                          "${_fix}")
    endif()
  endforeach()
endforeach()

# install(FILES) for one owner's headers, each into its directory under include/.
function(_idem_install_headers owner)
  foreach(_header IN LISTS _idem_headers_of_${owner})
    get_filename_component(_dir ${_header} DIRECTORY)
    install(FILES ${PROJECT_SOURCE_DIR}/include/${_header}
            DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/${_dir})
  endforeach()
endfunction()

# ---------------------------------------------------------------------------------------------
# Libraries, export sets and headers.

install(TARGETS idem EXPORT idem-targets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
_idem_install_headers(core)
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
  _idem_install_headers(${_comp})
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
# dependencies go in Requires.private. idem's own modules (idem, and idem-sqlite ... for
# idem-open_store) are always in Requires.
file(RELATIVE_PATH _idem_pc_to_prefix
     ${CMAKE_INSTALL_PREFIX}/${IDEM_INSTALL_PKGCONFIGDIR} ${CMAKE_INSTALL_PREFIX})
string(REGEX REPLACE "/$" "" _idem_pc_to_prefix "${_idem_pc_to_prefix}")
function(_idem_write_pc name target description requires_idem)
  _idem_dependencies(${target} _code _requires _libs _idem_requires)
  if(requires_idem AND _idem_requires)
    string(APPEND requires_idem ", ")
  endif()
  string(APPEND requires_idem "${_idem_requires}")
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
