// Stand-in for the Apple SDK header (compile check only; see README.md).
#pragma once
typedef int kern_return_t;
typedef unsigned int mach_port_t;
typedef mach_port_t task_id_token_t;
typedef mach_port_t task_t;
