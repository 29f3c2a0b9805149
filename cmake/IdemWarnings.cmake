# Warnings and sanitizers for every target this project builds (not for consumers).
function(idem_target_defaults target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow)
  if(IDEM_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=${IDEM_SANITIZE} -fno-omit-frame-pointer
                                             -fno-sanitize-recover=all)
    target_link_options(${target} PRIVATE -fsanitize=${IDEM_SANITIZE})
  endif()
endfunction()
